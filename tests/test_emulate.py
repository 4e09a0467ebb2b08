"""Tests for qdefend.devices.emulate: QEMU user-mode arm64 runs of a device bundle's --check.

The fast tests check the pieces without running QEMU: device -> CPU mapping, command lines (never
``-cpu max``), the pip download of aarch64 wheels, requirements hashing, cache stamps, stale builds,
the lock, the /proc/cpuinfo check, bundle staging and the one-line errors. The slow test (markers
``slow`` and ``emulation``) builds the cached arm64 rootfs (~6 min the first time, root) and runs
real bundles' ``runner.py --check`` on an emulated Cortex-A72 (Pi 4) and Cortex-A76 (Pi 5),
requiring the int8 features to equal the x86 ones bit for bit.
"""

import fcntl
import io
import json
import os
import platform
import shutil
import subprocess
import tarfile

import pytest

from qdefend.cli import main
from qdefend.devices import emulate as E
from qdefend.errors import QdefendError

pytestmark = pytest.mark.usefixtures("one_thread")

A72_CPUINFO = """processor\t: 0
BogoMIPS\t: 100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""
X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum
flags\t\t: fpu vme de pse tsc avx512_vnni
"""


def _mini_bundle(folder, requirements="numpy==2.4.6\n"):
    folder.mkdir(parents=True)
    (folder / "runner.py").write_text("print('{\"ok\": true}')\n")
    (folder / "requirements.txt").write_text(requirements)
    return folder


def test_pis_map_to_their_cortex_cores_and_nothing_else_is_emulated():
    assert E.emulated_devices() == {"rpi4": "cortex-a72", "rpi5": "cortex-a76", "generic-aarch64": "cortex-a72"}
    assert E.EmulateConfig(device="rpi5").cpu == "cortex-a76"


@pytest.mark.parametrize("name", ["pi4", "x86_64", "android-arm64"])
def test_bad_device_is_refused_listing_the_valid_ones_before_touching_the_cache(name, tmp_path):
    with pytest.raises(QdefendError, match=r"cannot emulate device .*valid: rpi4, rpi5, generic-aarch64"):
        E.emulate(tmp_path, device=name, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(QdefendError, match="timeout_s must be a finite number > 0"):
        E.EmulateConfig(timeout_s=0)


def test_cli_devices_emulate_reports_a_bad_device_on_one_line(tmp_path, capsys):
    assert main(["devices", "emulate", str(tmp_path), "--device", "pi5", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "valid: rpi4, rpi5, generic-aarch64" in err


def test_qemu_command_names_the_cpu_and_rootfs_and_never_max(tmp_path):
    cmd = E.qemu_command(tmp_path / "qemu-aarch64", tmp_path / "rootfs", "cortex-a76", ["py", "runner.py", "--check"])
    assert cmd == [str(tmp_path / "qemu-aarch64"), "-cpu", "cortex-a76", "-L", str(tmp_path / "rootfs"),
                   "py", "runner.py", "--check"]
    with pytest.raises(QdefendError, match="never -cpu max"):
        E.qemu_command(tmp_path, tmp_path, "max", [])


def test_pip_download_fetches_cp311_manylinux_aarch64_wheels_only(tmp_path):
    cmd = E.pip_download_command(tmp_path / "requirements.txt", tmp_path / "wheels", python="py")
    assert cmd[:4] == ["py", "-m", "pip", "download"] and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.11" and cmd[cmd.index("--implementation") + 1] == "cp"
    plats = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"]
    assert plats == ["manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_27_aarch64",
                     "manylinux_2_28_aarch64", "manylinux_2_34_aarch64"]
    assert cmd[-4:] == ["-r", str(tmp_path / "requirements.txt"), "-d", str(tmp_path / "wheels")]


def test_requirements_hash_ignores_layout_but_not_versions_or_shipped_wheels(tmp_path):
    h = E.requirements_hash("ai-edge-litert==2.3.0\nnumpy==2.4.6\n")
    assert len(h) == 16 and int(h, 16) >= 0
    assert E.requirements_hash("# pinned\nNumPy == 2.4.6  # numpy\n\nai_edge_litert==2.3.0\n") == h
    assert E.requirements_hash("ai-edge-litert==2.3.0\nnumpy==2.4.5\n") != h
    wheel = tmp_path / "numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.whl"
    wheel.write_bytes(b"x" * 10)
    assert E.requirements_hash("ai-edge-litert==2.3.0\nnumpy==2.4.6\n", [wheel]) != h
    assert E.normalize_requirements("Foo.Bar_baz >= 1.0 ; python_version>'3'\n") == ["foo-bar-baz>=1.0;python_version>'3'"]


def test_cache_root_argument_beats_env_beats_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QDEFEND_CACHE", raising=False)
    assert E.cache_root() == (tmp_path / "home/.cache/qdefend/arm64").resolve()
    monkeypatch.setenv("QDEFEND_CACHE", str(tmp_path / "env"))
    assert E.cache_root() == (tmp_path / "env/arm64").resolve()
    assert E.cache_root(tmp_path / "arg") == (tmp_path / "arg/arm64").resolve()


def test_stamps_mark_complete_builds_and_interrupted_ones_are_found_and_removed(tmp_path):
    final, tmp = tmp_path / E.ROOTFS, tmp_path / f"{E.ROOTFS}.tmp-4242"
    (final / "usr/bin").mkdir(parents=True)
    (tmp / "var").mkdir(parents=True)
    assert E.read_stamp(final) is None
    assert E.stale_builds(tmp_path) == [tmp, final]
    E.write_stamp(final, {"python": "3.11.2"})
    assert E.read_stamp(final) == {"python": "3.11.2"} and E.stale_builds(tmp_path) == [tmp]
    (final / E.STAMP).write_text("{truncated")
    assert E.read_stamp(final) is None
    for p in E.stale_builds(tmp_path):
        E.remove_tree(p)
    assert not tmp.exists() and not final.exists()


def test_cache_lock_is_exclusive_across_open_files(tmp_path):
    said = []
    with E.cache_lock(tmp_path, said.append):
        with open(tmp_path / ".lock") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / ".lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert said == []


def test_rootfs_build_without_root_says_so_and_a_stamped_venv_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    steps = E._Steps(lambda m: None)
    with pytest.raises(QdefendError, match="needs root"):
        E.ensure_rootfs(tmp_path, steps, tmp_path / "qemu-aarch64")
    rootfs = tmp_path / "rootfs"
    req = _mini_bundle(tmp_path / "b") / "requirements.txt"
    venv = rootfs / "opt/qdefend/venvs" / E.requirements_hash(req.read_text())
    venv.mkdir(parents=True)
    E.write_stamp(venv, {"rootfs": str(rootfs)})  # no qemu exists: reuse must not run anything
    assert E.ensure_venv(tmp_path, rootfs, tmp_path / "no-qemu", req, steps) == venv


def test_missing_host_tool_names_the_apt_package(monkeypatch):
    monkeypatch.setattr(E.shutil, "which", lambda tool: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(QdefendError, match=r"debootstrap is missing: install it with `apt-get install debootstrap`"):
        E._need_tool("debootstrap", "debootstrap", lambda m: None)


def test_binfmt_rule_registers_aarch64_elf_with_the_fix_binary_flag(tmp_path):
    rule = E.binfmt_rule(tmp_path / "qemu-aarch64")
    assert rule.startswith(r":qdefend-aarch64:M::\x7fELF\x02\x01\x01") and rule.endswith(f":{tmp_path}/qemu-aarch64:F")
    assert r"\x02\x00\xb7\x00:" in rule  # e_machine 0xb7 = EM_AARCH64


def test_cpuinfo_must_be_arm_and_name_the_emulated_core():
    info = E.check_cpuinfo(A72_CPUINFO, "cortex-a72")
    assert info["implementer"] == "0x41" and info["part"] == "0xd08" and "asimd" in info["features"]
    with pytest.raises(E.EmulationError, match=r"host's \(x86\).*qemu-user >= 8.1"):
        E.check_cpuinfo(X86_CPUINFO, "cortex-a72")
    with pytest.raises(E.EmulationError, match="not cortex-a76"):
        E.check_cpuinfo(A72_CPUINFO, "cortex-a76")


def test_parse_result_takes_the_last_json_line():
    assert E.parse_result('loading...\n{"ok": false}\nINFO: XNNPACK\n{"ok": true, "n": 3}\n') == {"ok": True, "n": 3}
    with pytest.raises(E.EmulationError, match="no JSON result line: Segmentation fault"):
        E.parse_result("hello\nSegmentation fault\n")


def _tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_stage_bundle_copies_folders_unpacks_archives_and_refuses_the_rest(tmp_path):
    b = _mini_bundle(tmp_path / "src" / "qdefend-bundle-demo-rpi4")
    assert E.stage_bundle(b, tmp_path / "d1") == tmp_path / "d1" / b.name
    assert E.stage_bundle(b.parent, tmp_path / "d2") == tmp_path / "d2" / b.name  # the folder above works too
    assert (tmp_path / "d2" / b.name / "requirements.txt").read_text() == "numpy==2.4.6\n"
    top = "qdefend-bundle-demo-rpi5"
    arc = _tar(tmp_path / "b.tar.gz", [(f"{top}/runner.py", b"print(1)\n"), (f"{top}/requirements.txt", b"numpy\n")])
    (tmp_path / "d3").mkdir()
    assert E.stage_bundle(arc, tmp_path / "d3") == tmp_path / "d3" / top
    evil = _tar(tmp_path / "evil.tar.gz", [("../evil/runner.py", b"x")])
    (tmp_path / "d4").mkdir()
    with pytest.raises(QdefendError, match="evil.tar.gz"):
        E.stage_bundle(evil, tmp_path / "d4")
    assert not (tmp_path / "evil").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(QdefendError, match="not a device bundle.*qdefend bundle RUN --device rpi4"):
        E.stage_bundle(tmp_path / "empty", tmp_path / "d5")
    with pytest.raises(QdefendError, match="no such bundle"):
        E.stage_bundle(tmp_path / "missing.zip", tmp_path / "d6")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian hosts)")
def test_unpack_base_finishes_a_foreign_tree_without_emulation(tmp_path):
    pkg = tmp_path / "pkg"
    for rel, text in [("DEBIAN/control", "Package: fake\nVersion: 1\nArchitecture: all\nMaintainer: x <x@y>\n"
                                          "Description: fake\n"),
                      ("usr/share/base-passwd/passwd.master", "root:x:0:0:root:/root:/bin/sh\n"),
                      ("usr/share/base-passwd/group.master", "root:x:0:\n"), ("usr/lib/hello.txt", "hi\n")]:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    target = tmp_path / "target"
    (target / "debootstrap").mkdir(parents=True)
    (target / "etc").mkdir()
    (target / "var/cache/apt/archives").mkdir(parents=True)
    subprocess.run(["dpkg-deb", "--build", str(pkg), str(target / "var/cache/apt/archives/fake_1_all.deb")],
                   check=True, capture_output=True)
    (target / "debootstrap/debpaths").write_text("fake /var/cache/apt/archives/fake_1_all.deb\n")
    (target / "debootstrap/base").write_text("fake\n")
    (target / "usr").mkdir()
    os.symlink("usr/lib", target / "lib")  # merged /usr, as debootstrap makes it
    os.symlink("/proc", target / "proc")
    assert E.unpack_base(target, tmp_path / "log") == 1
    assert (target / "lib/hello.txt").read_text() == "hi\n" and (target / "lib").is_symlink()
    assert (target / "etc/passwd").read_text().startswith("root:x:0:0") and (target / "etc/group").is_file()
    assert (target / "proc").is_dir() and not (target / "proc").is_symlink()


def test_guest_environment_keeps_host_python_out(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/host/site-packages")
    env = E.guest_env(tmp_path)
    assert "PYTHONPATH" not in env and "LD_LIBRARY_PATH" not in env and env["PYTHONNOUSERSITE"] == "1"
    assert env["HOME"].startswith(str(tmp_path)) and not any(k.startswith("QEMU") for k in env)


# ------------------------------------------------------------------ the real thing (slow, network, root)


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """A tiny QAT run (quarter-width encoder, 256 images, 1 epoch) exported with both int8 formats."""
    from conftest import tiny_exported_run

    return tiny_exported_run(tmp_path_factory.mktemp("emu") / "tiny")


@pytest.mark.slow
@pytest.mark.emulation
@pytest.mark.timeout(1500)
def test_bundles_pass_their_check_bit_exact_on_emulated_pi4_and_pi5(exported_run, tmp_path):
    bundle_mod = pytest.importorskip("qdefend.devices.bundle")
    if not hasattr(bundle_mod, "make_bundle"):
        pytest.skip("qdefend.devices.bundle.make_bundle is not there yet")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("QEMU user-mode emulation runs on Linux x86_64/aarch64 hosts")
    if os.geteuid() != 0 and E.read_stamp(E.cache_root() / E.ROOTFS) is None:
        pytest.skip("building the arm64 rootfs needs root (debootstrap + chroot); none is cached")
    cases = [("rpi4", None, "cortex-a72", "0xd08"), ("rpi5", None, "cortex-a76", "0xd0b"),
             ("rpi5", "onnxruntime", "cortex-a76", "0xd0b")]
    for device, runtime, cpu, part in cases:
        arc = bundle_mod.make_bundle(exported_run, device, runtime=runtime, out=tmp_path / f"{device}-{runtime}")
        res = E.emulate(arc, device=device)
        print(json.dumps(res, sort_keys=True))
        assert res["ok"] is True and res["parity"]["bit_identical"] is True, res
        assert res["parity"]["mismatches"] == 0 and res["machine"] == "aarch64"
        assert res["interpreter"] == (runtime or "litert")
        emu = res["emulation"]
        assert emu["qemu_cpu"] == cpu and emu["cpuinfo"]["part"] == part
        assert emu["python"].startswith("3.11.") and emu["glibc"] == "2.36" and int(emu["qemu"].split(".")[0]) >= 10
