"""Run a device bundle's ``runner.py --check`` on an emulated Raspberry Pi (QEMU user mode).

``emulate(bundle, device="rpi4")`` stands in for a Pi without one: an arm64 Debian 12 (bookworm)
userland (Python 3.11.2, glibc 2.36, as on 64-bit Raspberry Pi OS) is run by ``qemu-aarch64 -cpu
cortex-a72`` (Pi 4) or ``cortex-a76`` (Pi 5) under ``-L ROOTFS``, so the bundle's stock aarch64
wheels (LiteRT, onnxruntime, tflite-runtime, numpy) execute their real ARM kernels. The runner's
``--check`` compares the int8 features with the x86 reference outputs stored in the bundle: they
must be bit-identical. Emulated timings say nothing about a real Pi.

Everything is cached under ``~/.cache/qdefend/arm64`` (``QDEFEND_CACHE`` or ``cache_dir`` replace
``~/.cache/qdefend``), built once, under a lock, each piece marked complete by a stamp file:

- ``qemu/qemu-aarch64``: static qemu-user 10.x unpacked from bookworm-backports with apt-get
  download + dpkg-deb (Debian 12's qemu-user-static 7.2 passes the host's x86 /proc/cpuinfo through
  and crashes onnxruntime at import and LiteRT at allocate_tensors).
- ``rootfs-bookworm/``: ``debootstrap --foreign --variant=minbase --include=python3,python3-venv``,
  finished by unpacking the remaining packages with the host's dpkg-deb (needs root; ~1.5 min on 2
  cores); the emulated second stage (chroot + binfmt_misc) is an option: 14-15 min on 2 busy cores.
  Built in a temporary folder and renamed when complete, so an interrupted build is redone.
- ``wheels/``: aarch64 wheels of the bundle's requirements.txt, fetched on the host by
  ``pip download`` (pip inside the emulated rootfs has no network), unless the bundle ships wheels/.
- ``rootfs-bookworm/opt/qdefend/venvs/HASH``: one venv per requirements hash, installed by the
  emulated pip with ``--no-index --find-links``, which checks the wheel tags against the real
  aarch64 interpreter.

Paper: Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-
Only Inference" (CVPR 2018): integer-only int8 inference, whose outputs are exact integers and so
can be compared bit for bit across CPUs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from qdefend.checks import check_number, require
from qdefend.errors import QdefendError
from .profiles import AARCH64_PLATFORMS, DEVICES

__all__ = ["EmulateConfig", "EmulationError", "emulate", "emulated_devices", "cache_root", "ensure_qemu",
           "ensure_rootfs", "ensure_venv", "qemu_command", "pip_download_command", "requirements_hash",
           "check_cpuinfo", "parse_result", "stage_bundle"]

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
INCLUDE = ("python3", "python3-venv")
PYTHON_VERSION = "3.11"
QEMU_PACKAGE, QEMU_SUITE = "qemu-user", "bookworm-backports"
MIN_QEMU = (8, 1)  # the first qemu-user that emulates an aarch64 /proc/cpuinfo
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
STAMP = ".qdefend-complete"
ROOTFS = f"rootfs-{SUITE}"
BUILD_CPU = "cortex-a72"  # CPU for dpkg and pip during the build (never "max")
CPU_PART = {"cortex-a53": 0xD03, "cortex-a72": 0xD08, "cortex-a76": 0xD0B}  # MIDR part numbers
BINFMT_NAME = "qdefend-aarch64"
AARCH64_MAGIC = r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
AARCH64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
PROBE = ("import json,os,platform;print(json.dumps({'machine':platform.machine(),'python':platform.python_version(),"
         "'glibc':os.confstr('CS_GNU_LIBC_VERSION').split()[-1],'cpuinfo':open('/proc/cpuinfo').read()}))")

Progress = Callable[[str], None]


class EmulationError(QdefendError):
    """The emulated run failed; ``result`` holds the runner's JSON when it printed one."""

    def __init__(self, message: str, result: Optional[dict] = None, output: str = ""):
        super().__init__(message)
        self.result, self.output = result, output


def emulated_devices() -> dict[str, str]:
    """Device profile name -> QEMU ``-cpu`` for every profile that QEMU stands in for (Pis first)."""

    names = sorted(DEVICES.names(), key=lambda n: (not n.startswith("rpi"), n))
    return {n: p.qemu_cpu for n in names if (p := DEVICES.get(n)).arch == "aarch64" and p.qemu_cpu}


@dataclass
class EmulateConfig:
    """What :func:`emulate` runs: which device, where the cache lives, which mirror and qemu."""

    device: str = "rpi4"
    cache_dir: Optional[str] = None  # replaces ~/.cache/qdefend (env QDEFEND_CACHE does too)
    mirror: str = MIRROR
    qemu: Optional[str] = None  # a qemu-aarch64 >= 8.1 to use instead of the cached one (env QDEFEND_QEMU)
    timeout_s: float = 1800.0  # for the emulated runner.py --check

    def __post_init__(self):
        devices = emulated_devices()
        require(self.device in devices, f"cannot emulate device {self.device!r}; valid: {', '.join(devices)} "
                                        "(e.g. --device rpi4)")
        check_number(self.timeout_s, "emulation timeout_s", lo=0, lo_open=True, fix="timeout_s=1800")
        require(self.mirror.startswith(("http://", "https://")), f"mirror {self.mirror!r} is not a URL: e.g. {MIRROR}")

    @property
    def cpu(self) -> str:
        return emulated_devices()[self.device]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The arm64 cache: CACHE/arm64 with CACHE = `cache_dir`, else $QDEFEND_CACHE, else ~/.cache/qdefend."""
    base = cache_dir or os.environ.get("QDEFEND_CACHE") or Path.home() / ".cache" / "qdefend"
    return (Path(base).expanduser() / "arm64").resolve()


def qemu_command(qemu: Path, rootfs: Path, cpu: str, argv: list) -> list[str]:
    """``qemu-aarch64 -cpu CPU -L ROOTFS ARGV...``: guest paths resolve in ROOTFS first, then the host."""
    if cpu == "max":
        raise QdefendError("never -cpu max (wrong int8 results on qemu 7.2): use cortex-a72 or cortex-a76")
    return [str(qemu), "-cpu", cpu, "-L", str(rootfs), *map(str, argv)]


def pip_download_command(requirements: Path, dest: Path, python: str = sys.executable) -> list[str]:
    """Host-side ``pip download`` of the cp311 manylinux aarch64 wheels of `requirements`."""

    plats = [a for p in AARCH64_PLATFORMS for a in ("--platform", p)]
    return [python, "-m", "pip", "download", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
            "--implementation", "cp", *plats, "--disable-pip-version-check", "-q", "-r", str(requirements),
            "-d", str(dest)]


def normalize_requirements(text: str) -> list[str]:
    """Sorted requirement lines without comments or blanks, names canonical (PEP 503), no spaces."""
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(.*)", line)
        if m:
            line = re.sub(r"[-_.]+", "-", m[1]).lower() + "".join(m[2].split())
        elif line:
            line = " ".join(line.split())
        if line:
            out.append(line)
    return sorted(out)


def requirements_hash(text: str, wheels: list[Path] | tuple = ()) -> str:
    """16 hex digits naming the venv for these requirements (and the bundle's own wheels, if any)."""
    h = hashlib.sha256(f"{SUITE} cp{PYTHON_VERSION.replace('.', '')} aarch64\n".encode())
    for line in normalize_requirements(text):
        h.update(f"{line}\n".encode())
    for w in sorted(wheels, key=lambda p: p.name):
        h.update(f"wheel {w.name} {w.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ small helpers


class _Steps:
    """Prints what is being done and how long it took; keeps the timings."""

    def __init__(self, progress: Optional[Progress]):
        self.say = progress or (lambda m: print(m, file=sys.stderr, flush=True))
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, key: str, what: str) -> Iterator[None]:
        self.say(f"emulate: {what} ...")
        t = time.perf_counter()
        yield
        self.seconds[key] = round(self.seconds.get(key, 0.0) + time.perf_counter() - t, 1)
        self.say(f"emulate: {what}: done in {time.perf_counter() - t:.1f} s")


def _run(cmd: list, what: str, log: Optional[Path] = None, **kw) -> subprocess.CompletedProcess:
    """Run `cmd`; output goes to `log` (appended) or is captured; failure -> one-line QdefendError."""
    sink = open(log, "a") if log else None
    try:
        if sink:
            sink.write(f"\n$ {' '.join(map(str, cmd))}\n")
            sink.flush()
        p = subprocess.run([str(c) for c in cmd], stdout=sink or subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, **kw)
    except FileNotFoundError as e:
        raise QdefendError(f"{what}: {e.filename} not found") from None
    finally:
        if sink:
            sink.close()
    if p.returncode != 0:
        text = log.read_text(errors="replace") if log else p.stdout or ""
        last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "no output")
        raise QdefendError(f"{what} failed (exit {p.returncode}): {last[:300]}" + (f"; full log: {log}" if log else ""))
    return p


def _need_tool(tool: str, package: str, say: Progress, path: Optional[str] = None) -> None:
    """Make sure `tool` (or file `path`) exists: apt-get install `package` as root, else say how."""
    have = (lambda: Path(path).exists()) if path else (lambda: shutil.which(tool) is not None)
    if have():
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say(f"emulate: {tool} is missing: apt-get install {package}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", package], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if have():
            return
    raise QdefendError(f"{tool} is missing: install it with `apt-get install {package}` (as root)")


@contextlib.contextmanager
def cache_lock(root: Path, say: Progress) -> Iterator[None]:
    """An exclusive lock on ROOT/.lock, so two processes (CI steps) never build at once."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"emulate: waiting for another qdefend process building in {root} (lock {root / '.lock'})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_stamp(folder: Path) -> Optional[dict]:
    """The stamp of a completed build in `folder`, or None when it is missing or incomplete."""
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


def write_stamp(folder: Path, info: dict) -> None:
    tmp = folder / f"{STAMP}.tmp"
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    os.replace(tmp, folder / STAMP)


def _mounts_under(path: Path) -> list[str]:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), ln.split()[1]) for ln in lines if ln.split()]
    return sorted((p for p in points if p.startswith(f"{path}/")), key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Delete a (partial) rootfs: first unmount /proc, /sys, /dev an interrupted chroot left inside."""
    for mp in _mounts_under(path):
        subprocess.run(["umount", "-l", mp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if _mounts_under(path):
        raise QdefendError(f"cannot delete {path}: still mounted: {', '.join(_mounts_under(path))}")
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def stale_builds(root: Path) -> list[Path]:
    """Leftovers of interrupted builds: temporary folders, and a rootfs without its stamp."""
    out = sorted(root.glob(f"{ROOTFS}.tmp-*")) + sorted(root.glob("qemu.tmp-*"))
    if (root / ROOTFS).exists() and read_stamp(root / ROOTFS) is None:
        out.append(root / ROOTFS)
    return out


def qemu_version(qemu: Path) -> tuple[int, int, str]:
    p = _run([qemu, "--version"], f"{qemu} --version")
    m = re.search(r"version (\d+)\.(\d+)\S*", p.stdout)
    if not m:
        raise QdefendError(f"{qemu} --version printed no version: {p.stdout.strip()[:200]}")
    return int(m[1]), int(m[2]), m[0].split()[1]


# ------------------------------------------------------------------ building the cache


def ensure_qemu(root: Path, steps: _Steps, qemu: Optional[str] = None, mirror: str = MIRROR) -> Path:
    """A static qemu-aarch64 >= 8.1: `qemu` / $QDEFEND_QEMU, else qemu-user from bookworm-backports."""
    explicit = qemu or os.environ.get("QDEFEND_QEMU")
    path = Path(explicit).resolve() if explicit else root / "qemu" / "qemu-aarch64"
    if explicit or read_stamp(path.parent):
        major, minor, v = qemu_version(path)
        if (major, minor) < MIN_QEMU:
            raise QdefendError(f"{path} is qemu {v}: below 8.1 it passes the host's x86 /proc/cpuinfo through and "
                               f"onnxruntime / LiteRT crash; unset QDEFEND_QEMU to use qemu-user 10 from {QEMU_SUITE}")
        return path
    with cache_lock(root, steps.say):
        if read_stamp(path.parent):
            return path
        for tool, pkg in (("apt-get", "apt"), ("dpkg-deb", "dpkg"), ("tar", "tar")):
            _need_tool(tool, pkg, steps.say)
        _need_tool("debian-archive-keyring", "debian-archive-keyring", steps.say, path=KEYRING)
        tmp = root / f"qemu.tmp-{os.getpid()}"
        remove_tree(tmp)
        for d in ("lists/partial", "cache/archives/partial", "sources.list.d", "deb", "x"):
            (tmp / d).mkdir(parents=True)
        (tmp / "sources.list").write_text(f"deb [signed-by={KEYRING}] {mirror} {QEMU_SUITE} main\n")
        apt = ["-q", "-o", f"Dir::Etc::SourceList={tmp}/sources.list", "-o", f"Dir::Etc::SourceParts={tmp}/sources.list.d",
               "-o", f"Dir::State::Lists={tmp}/lists", "-o", f"Dir::Cache={tmp}/cache", "-o", "APT::Get::List-Cleanup=0"]
        with steps.step("qemu", f"fetching {QEMU_PACKAGE} (qemu 10, static) from {QEMU_SUITE} with apt-get download (~60 MB)"):
            _run(["apt-get", *apt, "update"], f"apt-get update ({QEMU_SUITE})", log=root / "build.log")
            _run(["apt-get", *apt, "download", f"{QEMU_PACKAGE}/{QEMU_SUITE}"], f"apt-get download {QEMU_PACKAGE}",
                 log=root / "build.log", cwd=tmp / "deb")
            deb = next((tmp / "deb").glob(f"{QEMU_PACKAGE}_*.deb"))
            _run(["sh", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" ./usr/bin/qemu-aarch64', "sh", deb, tmp / "x"],
                 f"unpacking qemu-aarch64 from {deb.name}", log=root / "build.log")
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "x/usr/bin/qemu-aarch64", path)
        path.chmod(0o755)
        remove_tree(tmp)
        major, minor, v = qemu_version(path)
        write_stamp(path.parent, {"qemu": v, "package": deb.name})
        steps.say(f"emulate: qemu-aarch64 {v} in {path}")
        return path


def binfmt_rule(qemu: Path) -> str:
    """The binfmt_misc registration line for aarch64 ELF files (F: the kernel opens `qemu` now)."""
    return f":{BINFMT_NAME}:M::{AARCH64_MAGIC}:{AARCH64_MASK}:{qemu}:F"


@contextlib.contextmanager
def binfmt(qemu: Path) -> Iterator[None]:
    """Register `qemu` for aarch64 ELF files with binfmt_misc (F: opened now, so it works in a
    chroot) for the duration of the block; removed afterwards."""
    d = Path("/proc/sys/fs/binfmt_misc")
    if not (d / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(d)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    entry = d / BINFMT_NAME
    try:
        if entry.exists():
            entry.write_text("-1")
        (d / "register").write_text(binfmt_rule(qemu))
    except OSError as e:
        raise QdefendError(f"cannot register qemu with binfmt_misc ({e}): the rootfs build runs arm64 dpkg in a "
                           f"chroot; build as root on a host or VM that allows binfmt_misc (a privileged container)") from None
    try:
        yield
    finally:
        if entry.exists():
            entry.write_text("-1")


def unpack_base(target: Path, log: Path) -> int:
    """Finish a ``debootstrap --foreign`` tree without emulation: unpack the base packages (python3 and
    its dependencies) with the host's dpkg-deb, as debootstrap unpacks the required ones, then set up
    what their maintainer scripts would that a Python program needs (passwd/group, ld.so.cache).
    Runs in seconds; the emulated dpkg of the second stage takes 5-15 min on 2 cores."""
    boot = target / "debootstrap"
    debs = dict(ln.split(None, 1) for ln in (boot / "debpaths").read_text().splitlines() if ln.strip())
    base = (boot / "base").read_text().split()
    for pkg in base:
        _run(["sh", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar --keep-directory-symlink -x -C "$2"', "sh",
              target / debs[pkg].strip().lstrip("/"), target], f"unpacking {pkg}", log=log)
    for name in ("passwd", "group"):
        if not (target / "etc" / name).exists():
            shutil.copyfile(target / f"usr/share/base-passwd/{name}.master", target / "etc" / name)
    if (target / "proc").is_symlink():  # --foreign links proc -> /proc; a booted rootfs has a folder
        (target / "proc").unlink()
        (target / "proc").mkdir(mode=0o555)
    return len(base)


def ensure_rootfs(root: Path, steps: _Steps, qemu: Path, mirror: str = MIRROR, configure: Optional[bool] = None) -> Path:
    """The arm64 Debian bookworm minbase rootfs with python3 + venv (built once; needs root).

    ``debootstrap --foreign`` fetches and unpacks; then by default :func:`unpack_base` finishes it
    natively (~1.5 min in all). configure=True (or env QDEFEND_ROOTFS_CONFIGURE=1) runs the real
    second stage instead, every maintainer script under qemu in a chroot through binfmt_misc."""
    final = root / ROOTFS
    if read_stamp(final):
        return final
    configure = os.environ.get("QDEFEND_ROOTFS_CONFIGURE", "") not in ("", "0") if configure is None else configure
    with cache_lock(root, steps.say):
        if read_stamp(final):
            return final
        for old in stale_builds(root):
            steps.say(f"emulate: removing {old} (an interrupted build)")
            remove_tree(old)
        if os.geteuid() != 0:
            raise QdefendError(f"building the arm64 rootfs in {final} needs root (debootstrap): run it once as root, "
                               f"or set QDEFEND_CACHE to a cache that has one")
        _need_tool("debootstrap", "debootstrap", steps.say)
        _need_tool("debian-archive-keyring", "debian-archive-keyring", steps.say, path=KEYRING)
        tmp, log = root / f"{ROOTFS}.tmp-{os.getpid()}", root / "build.log"
        steps.say(f"emulate: building the arm64 Debian {SUITE} rootfs (python3 {PYTHON_VERSION}) once, cached in "
                  f"{final}: takes {'5-15' if configure else '1-2'} min on 2 cores; log: {log}")
        t0 = time.perf_counter()
        try:
            with steps.step("debootstrap", f"debootstrap --foreign (downloads and unpacks arm64 packages from {mirror})"):
                _run(["debootstrap", "--arch=arm64", "--variant=minbase", "--foreign", f"--keyring={KEYRING}",
                      f"--include={','.join(INCLUDE)}", SUITE, tmp, mirror], "debootstrap (first stage)", log=log)
            if configure:
                with steps.step("second_stage", "debootstrap second stage in a chroot under qemu (dpkg; the slow part)"):
                    with binfmt(qemu):
                        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "QEMU_CPU": BUILD_CPU,
                               "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
                        _run(["chroot", tmp, "/debootstrap/debootstrap", "--second-stage"],
                             "debootstrap --second-stage", log=log, env=env)
            else:
                with steps.step("unpack", "unpacking python3 and its dependencies with the host's dpkg-deb"):
                    unpack_base(tmp, log)
                    _run(qemu_command(qemu, tmp, BUILD_CPU, [tmp / "sbin/ldconfig", "-r", tmp]), "ldconfig", log=log)
        finally:
            for mp in _mounts_under(tmp):
                subprocess.run(["umount", "-l", mp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        remove_tree(tmp / "debootstrap")
        for junk in [*(tmp / "var/cache/apt/archives").glob("*.deb"), *(tmp / "var/lib/apt/lists").glob("*_*")]:
            junk.unlink()
        probe = _probe(qemu, tmp, tmp / "usr/bin/python3", BUILD_CPU)
        write_stamp(tmp, {"suite": SUITE, "include": list(INCLUDE), "mirror": mirror, "python": probe["python"],
                          "glibc": probe["glibc"], "configured": configure, "seconds": round(time.perf_counter() - t0, 1),
                          "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        os.rename(tmp, final)
        steps.say(f"emulate: rootfs ready (Python {probe['python']}, glibc {probe['glibc']}) in {final}")
        return final


def ensure_venv(root: Path, rootfs: Path, qemu: Path, requirements: Path, steps: _Steps,
                wheels: Optional[Path] = None) -> Path:
    """A venv in the rootfs with `requirements` installed by the emulated pip from local wheels:
    `wheels` (the bundle's own) or aarch64 wheels that the host's pip downloads into ROOT/wheels."""
    shipped = sorted(wheels.glob("*.whl")) if wheels else []
    h = requirements_hash(requirements.read_text(), shipped)
    venv = rootfs / "opt" / "qdefend" / "venvs" / h
    if (read_stamp(venv) or {}).get("rootfs") == str(rootfs):
        return venv
    with cache_lock(root, steps.say):
        if (read_stamp(venv) or {}).get("rootfs") == str(rootfs):
            return venv
        remove_tree(venv)
        links = wheels if shipped else root / "wheels"
        if not shipped:
            _run([sys.executable, "-m", "pip", "--version"], f"pip in {sys.executable} (needed to download aarch64 wheels)")
            with steps.step("wheels", f"pip download: aarch64 cp311 wheels of {requirements.name} on the host"):
                links.mkdir(parents=True, exist_ok=True)
                _run(pip_download_command(requirements, links), "pip download (aarch64 wheels)")
        # No subprocesses under qemu-user (without binfmt an emulated exec of an arm64 binary fails), so no
        # ensurepip: a bare venv, then the rootfs's own pip wheel run in-process by the venv's python.
        pip = next((rootfs / "usr/share/python-wheels").glob("pip-*.whl"), None)
        if pip is None:
            raise QdefendError(f"{rootfs} has no pip wheel (python3-pip-whl): delete {rootfs} to rebuild it")
        with steps.step("venv", f"creating venv {h} in the rootfs and installing the wheels (emulated pip)"):
            env = guest_env(rootfs)
            _run(qemu_command(qemu, rootfs, BUILD_CPU, [rootfs / "usr/bin/python3", "-m", "venv", "--without-pip", venv]),
                 "python3 -m venv (emulated)", env=env)
            _run(qemu_command(qemu, rootfs, BUILD_CPU, [venv / "bin/python3", pip / "pip", "install", "--no-index",
                                                         "--find-links", links, "--disable-pip-version-check",
                                                         "--no-cache-dir", "-q", "-r", requirements]),
                 "pip install --no-index (emulated)", env=env)
        write_stamp(venv, {"rootfs": str(rootfs), "requirements": normalize_requirements(requirements.read_text()),
                           "wheels": str(links)})
        return venv


# ------------------------------------------------------------------ running a bundle


def guest_env(rootfs: Path) -> dict[str, str]:
    """A clean environment for emulated programs: nothing of the host's Python or loader leaks in."""
    home = str(rootfs / "root")
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home,
            "XDG_CACHE_HOME": f"{home}/.cache", "PYTHONNOUSERSITE": "1", "TMPDIR": str(rootfs / "tmp")}


def check_cpuinfo(text: str, cpu: str) -> dict:
    """The emulated /proc/cpuinfo must be ARM's and name `cpu`; the host's x86 one crashes onnxruntime."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    if "vendor_id" in fields or "cpu implementer" not in fields:
        raise EmulationError("the emulated /proc/cpuinfo is the host's (x86), as with Debian 12's qemu-user-static 7.2: "
                             "onnxruntime crashes at import and LiteRT at allocate_tensors; use qemu-user >= 8.1 "
                             f"(unset QDEFEND_QEMU: qemu-user 10 from {QEMU_SUITE} is fetched into the cache)")
    part = fields.get("cpu part", "")
    want = CPU_PART.get(cpu)
    if want is not None and part and int(part, 16) != want:
        raise EmulationError(f"the emulated /proc/cpuinfo names CPU part {part}, not {cpu} ({want:#x})")
    return {"implementer": fields["cpu implementer"], "part": part, "features": fields.get("features", "").split()}


def _probe(qemu: Path, rootfs: Path, python: Path, cpu: str) -> dict:
    p = _run(qemu_command(qemu, rootfs, cpu, [python, "-c", PROBE]), f"probing the emulated {cpu}",
             env=guest_env(rootfs))
    return parse_result(p.stdout)


def parse_result(stdout: str) -> dict:
    """The last line of `stdout` that is a JSON object (the runner prints one)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    tail = stdout.strip().splitlines()[-1:] or ["no output"]
    raise EmulationError(f"the runner printed no JSON result line: {tail[0][:300]}", output=stdout)


def _bundle_dir(folder: Path, source: Path) -> Path:
    hits = [folder] if (folder / "runner.py").is_file() else [
        d for d in sorted(folder.iterdir()) if d.is_dir() and (d / "runner.py").is_file()]
    if len(hits) != 1:
        raise QdefendError(f"{source} is not a device bundle (no single folder with runner.py): make one with "
                           f"`qdefend bundle RUN --device rpi4`")
    if not (hits[0] / "requirements.txt").is_file():
        raise QdefendError(f"{source} has no requirements.txt next to runner.py: rebuild the bundle")
    return hits[0]


def stage_bundle(source: Path, dest: Path) -> Path:
    """Copy a bundle folder, or safely unpack a .tar.gz one, into `dest`; returns the folder with runner.py."""
    source = Path(source)
    if source.is_dir():
        src = _bundle_dir(source, source)
        shutil.copytree(src, dest / src.name, symlinks=True)
        return dest / src.name
    if source.is_file() and source.name.endswith((".tar.gz", ".tgz", ".tar")):
        try:
            with tarfile.open(source) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(dest, filter="data")
                else:
                    bad = [m.name for m in tar.getmembers() if m.name.startswith("/") or ".." in Path(m.name).parts
                           or m.issym() or m.islnk() or m.isdev()]
                    if bad:
                        raise QdefendError(f"{source}: unsafe member {bad[0]!r}: not a qdefend bundle")
                    tar.extractall(dest)
        except (tarfile.TarError, OSError) as e:
            raise QdefendError(f"{source}: cannot unpack ({e}): not a qdefend bundle archive") from None
        return _bundle_dir(dest, source)
    raise QdefendError(f"{source}: no such bundle folder or .tar.gz archive; make one with "
                       f"`qdefend bundle RUN --device rpi4`")


def emulate(bundle: str | os.PathLike, device: str = "rpi4", cache_dir: str | os.PathLike | None = None, *,
            mirror: str = MIRROR, qemu: Optional[str] = None, timeout_s: float = 1800.0,
            progress: Optional[Progress] = None) -> dict:
    """Run `bundle`'s ``runner.py --check`` on an emulated `device`; returns the runner's JSON with an
    added ``emulation`` entry (device, QEMU CPU, qemu/Python/glibc versions, cpuinfo, timings in s).

    Raises :class:`EmulationError` when the check fails (non-zero exit: e.g. features that differ from
    the x86 reference) and QdefendError for a bad device name, bundle or host set-up."""
    cfg = EmulateConfig(device=device, cache_dir=None if cache_dir is None else str(cache_dir), mirror=mirror,
                        qemu=qemu, timeout_s=timeout_s)
    steps = _Steps(progress)
    bundle = Path(bundle)
    if not bundle.exists():
        raise QdefendError(f"{bundle}: no such bundle folder or .tar.gz archive")
    root = cache_root(cfg.cache_dir)
    qemu_bin = ensure_qemu(root, steps, cfg.qemu, cfg.mirror)
    rootfs = ensure_rootfs(root, steps, qemu_bin, cfg.mirror)
    work = Path(tempfile.mkdtemp(prefix="qdefend-run-", dir=rootfs / "tmp"))
    try:
        bdir = stage_bundle(bundle, work)
        venv = ensure_venv(root, rootfs, qemu_bin, bdir / "requirements.txt", steps,
                           wheels=bdir / "wheels" if (bdir / "wheels").is_dir() else None)
        python = venv / "bin" / "python3"
        info = _probe(qemu_bin, rootfs, python, cfg.cpu)
        if info["machine"] != "aarch64":
            raise EmulationError(f"the emulated Python reports machine {info['machine']!r}, not aarch64")
        cpuinfo = check_cpuinfo(info.pop("cpuinfo"), cfg.cpu)
        with steps.step("check", f"runner.py --check on emulated {cfg.device} (qemu -cpu {cfg.cpu})"):
            try:
                p = subprocess.run(qemu_command(qemu_bin, rootfs, cfg.cpu, [python, "runner.py", "--check"]), cwd=bdir,
                                   env=guest_env(rootfs), capture_output=True, text=True, timeout=cfg.timeout_s)
            except subprocess.TimeoutExpired:
                raise EmulationError(f"runner.py --check on emulated {cfg.device} ran past {cfg.timeout_s:.0f} s") from None
        try:
            result = parse_result(p.stdout)
        except EmulationError:
            result = None
        if p.returncode != 0 or result is None:
            why = (f"qemu/python killed by signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}")
            tail = str(result.get("error") or json.dumps(result))[:400] if result else next(
                (ln.strip()[:300] for ln in reversed((p.stderr + p.stdout).splitlines()) if ln.strip()), "no output")
            raise EmulationError(f"runner.py --check failed on emulated {cfg.device} (qemu -cpu {cfg.cpu}, {why}): {tail}",
                                 result=result, output=p.stdout + p.stderr)
        result.setdefault("emulation", {
            "device": cfg.device, "qemu_cpu": cfg.cpu, "qemu": qemu_version(qemu_bin)[2], **info, "cpuinfo": cpuinfo,
            "suite": SUITE, "rootfs": str(rootfs), "venv": venv.name, "seconds": steps.seconds})
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
