"""``qdefend deploy BUNDLE --ssh user@host[:dir]`` or ``--adb SERIAL``: copy a bundle onto a device,
unpack it there and run its ``runner.py --check`` (and ``--bench``), reporting the JSON it prints.

Over ssh: ``ssh mkdir -p DIR``, ``scp`` the archive into DIR, then ``ssh`` runs
``cd DIR && tar -xzf ARCHIVE && cd TOP && PYTHON runner.py --check``. Over adb: ``adb push`` and
``adb shell`` the same (default DIR /data/local/tmp/qdefend). The device needs a Python 3 with numpy
and the bundle's interpreter (``pip install -r requirements.txt`` in the bundle); ``--python`` names
it (e.g. a venv's python). ssh runs with BatchMode (keys only, never a password prompt) and
StrictHostKeyChecking=accept-new (a new host's key is recorded, a changed one refused).

With ``send=URL`` (``--send URL --token-file F``) the deploy ends with a round trip to ``qdefend
serve``: the device encodes the bundle's reference images and posts their int8 features to URL
(``runner.py send``); the token travels on the ssh/adb stdin, never on a command line.

Paper: Vepakomma et al., "Split learning for health: Distributed deep learning without sharing raw
patient data" (2018): the edge half of the split network runs on the data owner's device.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Sequence

from qdefend.errors import QdefendError

from .bundle import bundle_top

__all__ = ["SSH_DIR", "ADB_DIR", "parse_ssh_target", "ssh_commands", "adb_commands", "deploy_ssh", "deploy_adb"]

SSH_DIR = "qdefend-bundles"  # relative to the remote user's home
ADB_DIR = "/data/local/tmp/qdefend"
_SSH_DEFAULTS = ("BatchMode=yes", "StrictHostKeyChecking=accept-new", "ConnectTimeout=15")


def parse_ssh_target(spec: str) -> tuple[str, str]:
    """'user@host[:dir]' -> ('user@host', dir); dir defaults to SSH_DIR (relative to home)."""
    host, _, directory = spec.partition(":")
    if not host or host.startswith("-") or any(c.isspace() for c in spec):
        raise QdefendError(f"--ssh {spec!r}: expected user@host or user@host:dir, e.g. --ssh pi@raspberrypi.local")
    directory = directory or SSH_DIR
    if directory in ("~", "~/"):
        directory = "."
    return host, directory.removeprefix("~/")


def _remote_script(directory: str, archive: str, top: str, python: str, runner_args: Sequence[str]) -> str:
    q = shlex.quote
    return (f"cd {q(directory)} && rm -rf {q(top)} && tar -xzf {q(archive)} && cd {q(top)} && "
            f"{q(python)} runner.py {' '.join(map(q, runner_args))}")


def _ssh_base(port: int | None, identity: str | os.PathLike | None, options: Sequence[str], port_flag: str) -> list[str]:
    args = []
    for opt in (*_SSH_DEFAULTS, *options):
        args += ["-o", opt]
    if port is not None:
        args += [port_flag, str(port)]
    if identity is not None:
        args += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    return args


def _send_script(directory: str, top: str, python: str, url: str, token: bool) -> str:
    q = shlex.quote
    read = "IFS= read -r QDEFEND_TOKEN && export QDEFEND_TOKEN && " if token else ""
    return (f"cd {q(directory)}/{q(top)} && {read}{q(python)} runner.py send reference/images.npy --url {q(url)}")


def ssh_commands(archive: str | os.PathLike, target: str, *, port: int | None = None,
                 identity: str | os.PathLike | None = None, python: str = "python3",
                 options: Sequence[str] = (), runner_args: Sequence[str] = ("--check",)) -> list[list[str]]:
    """The three commands deploy_ssh runs: make the folder, copy the archive, unpack and run."""
    archive = Path(archive)
    host, directory = parse_ssh_target(target)
    top = bundle_top(archive)
    q = shlex.quote
    ssh = ["ssh", *_ssh_base(port, identity, options, "-p"), host]
    scp = ["scp", "-q", *_ssh_base(port, identity, options, "-P"), str(archive), f"{host}:{directory}/{archive.name}"]
    return [[*ssh, f"mkdir -p {q(directory)}"], scp,
            [*ssh, _remote_script(directory, archive.name, top, python, runner_args)]]


def adb_commands(archive: str | os.PathLike, serial: str, *, python: str = "python3", directory: str = ADB_DIR,
                 runner_args: Sequence[str] = ("--check",)) -> list[list[str]]:
    """The three commands deploy_adb runs: make the folder, push the archive, unpack and run."""
    archive = Path(archive)
    top = bundle_top(archive)
    adb = ["adb", "-s", serial]
    return [[*adb, "shell", f"mkdir -p {shlex.quote(directory)}"],
            [*adb, "push", str(archive), f"{directory}/{archive.name}"],
            [*adb, "shell", _remote_script(directory, archive.name, top, python, runner_args)]]


def _last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _run(cmds: list[list[str]], where: str, timeout: float, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the set-up commands (all but the last) and return the last one's result."""
    tool = cmds[0][0]
    if shutil.which(tool) is None:
        hint = "apt-get install openssh-client" if tool in ("ssh", "scp") else "apt-get install adb (Android platform-tools)"
        raise QdefendError(f"{tool} not found on PATH: {hint}")
    for cmd in cmds:
        try:
            last = cmd is cmds[-1] and stdin is not None
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=stdin if last else None,
                                  stdin=None if last else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise QdefendError(f"{cmd[0]} to {where} timed out after {timeout:.0f} s: is the device reachable?") from None
        if cmd is cmds[-1]:
            return proc
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            raise QdefendError(f"{' '.join(cmd[:1] + cmd[-2:])} failed on {where} (exit {proc.returncode}: "
                               f"{lines[-1] if lines else 'no output'}): check the address, port, key and folder")
    raise AssertionError("unreachable")


def _deploy(cmds_for, where: str, transport: str, bench: bool, timeout: float, send_cmd=None,
            token: str | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {"transport": transport, "target": where}
    plan = cmds_for(("--check",))
    res["commands"] = [shlex.join(c) for c in plan]
    proc = _run(plan, where, timeout)
    check = _last_json(proc.stdout)
    if check is None:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        check = {"ok": False, "error": f"runner.py printed no JSON (exit {proc.returncode}): "
                                       f"{lines[-1] if lines else 'no output'}"}
    res["check"] = check
    res["ok"] = bool(check.get("ok")) and proc.returncode == 0
    if bench and res["ok"]:
        bench_cmd = cmds_for(("--bench",))[-1]
        res["commands"].append(shlex.join(bench_cmd))
        res["bench"] = _last_json(_run([bench_cmd], where, timeout).stdout)
    if send_cmd is not None and res["ok"]:
        res["commands"].append(shlex.join(send_cmd))
        proc = _run([send_cmd], where, timeout, stdin=(token or "") + "\n")
        sent = _last_json(proc.stdout)
        if sent is None:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            sent = {"ok": False, "error": lines[-1].removeprefix("error: ") if lines else f"exit {proc.returncode}"}
        res["send"] = sent
        res["ok"] = bool(sent.get("ok"))
    return res


def deploy_ssh(archive: str | os.PathLike, target: str, *, port: int | None = None,
               identity: str | os.PathLike | None = None, python: str = "python3",
               options: Sequence[str] = (), bench: bool = False, timeout: float = 600, send: str | None = None,
               token: str | None = None) -> dict[str, Any]:
    """Copy, unpack and check a bundle over ssh; returns {"ok", "check": runner JSON, "commands", ...}
    (and "send": the answer of `send`, a qdefend serve URL, to the reference images)."""
    host, directory = parse_ssh_target(target)
    send_cmd = None
    if send is not None:
        ssh = ssh_commands(archive, target, port=port, identity=identity, python=python, options=options)[0][:-1]
        send_cmd = [*ssh, _send_script(directory, bundle_top(archive), python, send, token is not None)]
    return _deploy(lambda args: ssh_commands(archive, target, port=port, identity=identity, python=python,
                                             options=options, runner_args=args),
                   f"{host}:{directory}", "ssh", bench, timeout, send_cmd, token)


def deploy_adb(archive: str | os.PathLike, serial: str, *, python: str = "python3", directory: str = ADB_DIR,
               bench: bool = False, timeout: float = 600, send: str | None = None,
               token: str | None = None) -> dict[str, Any]:
    """Copy, unpack and check a bundle over adb (the device's shell needs `python` with numpy)."""
    send_cmd = None
    if send is not None:
        send_cmd = ["adb", "-s", serial, "shell", _send_script(directory, bundle_top(archive), python, send,
                                                               token is not None)]
    return _deploy(lambda args: adb_commands(archive, serial, python=python, directory=directory, runner_args=args),
                   f"adb:{serial}:{directory}", "adb", bench, timeout, send_cmd, token)
