"""Tests for qdefend.devices.deploy: a bundle copied, unpacked and checked over real ssh/scp (an sshd
on 127.0.0.1 with throwaway keys, skipped where /usr/sbin/sshd is missing: apt-get install
openssh-server) and over adb (a fake adb on PATH records the commands).

The bundle holds the toy int8 ONNX encoder of tests/test_bundle.py (made in milliseconds), which
also covers bundles of a real QAT run.
"""

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import pytest

from qdefend.cli import main
from qdefend.devices.bundle import extract_bundle, make_bundle
from qdefend.devices.deploy import ADB_DIR, adb_commands, deploy_adb, deploy_ssh, parse_ssh_target, ssh_commands
from qdefend.errors import QdefendError
from test_bundle import toy_run

SSHD = "/usr/sbin/sshd"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """An x86_64 onnxruntime bundle of the toy int8 ONNX encoder of tests/test_bundle.py."""
    return make_bundle(toy_run(tmp_path_factory.mktemp("runs") / "toy"), "x86_64", fmt="onnx",
                       out=tmp_path_factory.mktemp("out"))


def test_parse_ssh_target():
    assert parse_ssh_target("pi@raspberrypi.local") == ("pi@raspberrypi.local", "qdefend-bundles")
    assert parse_ssh_target("pi@host:~/models") == ("pi@host", "models")
    assert parse_ssh_target("pi@host:/opt/q") == ("pi@host", "/opt/q")
    for bad in ("", ":dir", "-oProxyCommand=x", "pi@host:my dir"):
        with pytest.raises(QdefendError, match="expected user@host or user@host:dir"):
            parse_ssh_target(bad)


def test_ssh_commands(archive):
    top = "qdefend-bundle-toy-x86_64"
    cmds = ssh_commands(archive, "pi@rpi:b", port=2222, identity="/k/id", python="/v/bin/python")
    opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", "-o", "ConnectTimeout=15"]
    key = ["-i", "/k/id", "-o", "IdentitiesOnly=yes"]
    assert cmds[0] == ["ssh", *opts, "-p", "2222", *key, "pi@rpi", "mkdir -p b"]
    assert cmds[1] == ["scp", "-q", *opts, "-P", "2222", *key, str(archive), f"pi@rpi:b/{archive.name}"]
    assert cmds[2][-1] == (f"cd b && rm -rf {top} && tar -xzf {archive.name} && cd {top} && "
                           "/v/bin/python runner.py --check")


def test_unreachable_host_is_one_clear_error(archive):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(QdefendError, match=r"ssh .* failed on nobody@127.0.0.1:qdefend-bundles \(exit 255: .*"
                                           r"Connection refused\): check the address"):
        deploy_ssh(archive, "nobody@127.0.0.1", port=port, timeout=30)


# --------------------------------------------------------------------------------------------
# adb, with a fake adb that logs its arguments


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    """PATH gets an `adb` that logs each call (arguments separated by \\x1f) and answers runner.py."""
    bin_dir, log = tmp_path / "bin", tmp_path / "adb.log"
    bin_dir.mkdir()
    (bin_dir / "adb").write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do printf \'%s\\037\' "$a" >> "$FAKE_ADB_LOG"; done; echo >> "$FAKE_ADB_LOG"\n'
        'case "$*" in *runner.py*) echo "$FAKE_ADB_ANSWER";; esac\n')
    (bin_dir / "adb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_ANSWER", json.dumps({"ok": True, "parity": {"bit_identical": True}}))

    def calls():
        return [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]

    return calls


def test_adb_pushes_unpacks_and_checks(archive, fake_adb):
    res = deploy_adb(archive, "R58M123", python="python3")
    top = "qdefend-bundle-toy-x86_64"
    assert fake_adb() == [
        ["-s", "R58M123", "shell", f"mkdir -p {ADB_DIR}"],
        ["-s", "R58M123", "push", str(archive), f"{ADB_DIR}/{archive.name}"],
        ["-s", "R58M123", "shell", f"cd {ADB_DIR} && rm -rf {top} && tar -xzf {archive.name} && cd {top} && "
                                   "python3 runner.py --check"],
    ]
    assert [c[1:] for c in adb_commands(archive, "R58M123")] == fake_adb()
    assert res["ok"] and res["transport"] == "adb" and res["check"]["parity"]["bit_identical"]


def test_failed_device_check_is_reported_and_exits_2(archive, fake_adb, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_ADB_ANSWER", json.dumps({"ok": False, "error": "runtime.py (missing)"}))
    assert main(["deploy", str(archive), "--adb", "X1"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["check"]["error"] == "runtime.py (missing)"
    assert err.strip() == "error: the bundle check on adb:X1:/data/local/tmp/qdefend failed: runtime.py (missing)"
    assert main(["deploy", str(archive)]) == 2
    assert "exactly one of --ssh" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# ssh, for real: an sshd on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """(port, user, identity, known_hosts file) of an sshd on 127.0.0.1 with throwaway keys."""
    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} not found: apt-get install openssh-server to run the ssh deploy test")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    port = _free_port()
    sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server") if os.path.exists(p)),
                "internal-sftp")
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        f"UsePAM no\nSubsystem sftp {sftp}\nLogLevel ERROR\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([SSHD, "-f", str(d / "sshd_config"), "-D", "-e"], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "w"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited: {(d / 'sshd.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    yield port, getpass.getuser(), d / "user_key", d / "known_hosts"
    proc.terminate()
    proc.wait(timeout=10)


def test_ssh_deploy_runs_the_check_on_the_remote_side(archive, sshd, tmp_path):
    port, user, key, known = sshd
    remote = tmp_path / "remote"
    res = deploy_ssh(archive, f"{user}@127.0.0.1:{remote}", port=port, identity=key, python=sys.executable,
                     options=[f"UserKnownHostsFile={known}"], bench=True)
    check = res["check"]
    assert res["ok"] and check["ok"], check
    assert check["parity"]["bit_identical"] and check["interpreter"] == "onnxruntime"
    assert check["files_checked"] == 15 and check["device"] == "x86_64"  # 8 edge files, artifact, manifest, requirements, README, 3 reference
    assert (remote / archive.name).is_file() and (remote / "qdefend-bundle-toy-x86_64" / "runner.py").is_file()
    assert res["bench"]["latency_ms"]["p50"] > 0 and known.read_text().strip()


def test_cli_deploy_over_ssh_and_a_tampered_bundle(archive, sshd, tmp_path, capsys):
    port, user, key, known = sshd
    argv = ["--ssh", f"{user}@127.0.0.1:{tmp_path / 'remote'}", "--port", str(port), "--identity", str(key),
            "--python", sys.executable, "--ssh-option", f"UserKnownHostsFile={known}"]
    assert main(["deploy", str(archive), *argv]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] and res["check"]["parity"]["mismatches"] == 0
    root = extract_bundle(archive, tmp_path / "local")
    with open(root / "runtime.py", "a") as f:
        f.write("# edited\n")
    bad = tmp_path / "bad" / archive.name
    bad.parent.mkdir()
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    assert main(["deploy", str(bad), *argv]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] is False
    assert "failed: 1 file failed the integrity check: runtime.py (sha256 differs from bundle.json" in err


def test_ssh_deploy_ends_with_a_round_trip_to_qdefend_serve(sshd, tmp_path, capsys):
    """--send: the device (over real ssh) encodes the reference images and posts them to a real
    server on loopback; the token goes over stdin, so it is on no command line."""
    from qdefend.serve.app import create_app
    from qdefend.serve.service import ServeConfig
    from test_serve import TOKEN, LiveServer, toy_served_run

    port, user, key, known = sshd
    run = toy_served_run(tmp_path / "run")
    tok = tmp_path / "token.txt"
    tok.write_text(TOKEN)
    server = LiveServer(create_app(ServeConfig(run=str(run), head="float", token_file=str(tok))))
    try:
        archive = make_bundle(run, "x86_64", fmt="onnx", out=tmp_path / "b")
        argv = ["deploy", str(archive), "--ssh", f"{user}@127.0.0.1:{tmp_path / 'remote'}", "--port", str(port),
                "--identity", str(key), "--python", sys.executable, "--ssh-option", f"UserKnownHostsFile={known}",
                "--send", server.url, "--token-file", str(tok)]
        assert main(argv) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["send"]["ok"] and len(res["send"]["answers"]) == 8
        assert all(TOKEN not in c for c in res["commands"])
        wrong = tmp_path / "wrong.txt"
        wrong.write_text("w" * 20)
        assert main(argv[:-1] + [str(wrong)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "could not send" in err and "wrong bearer token" in err
    finally:
        server.stop()
