"""Tests for qdefend serve: the wire format, the service's checks, the HTTP API on loopback, the
device client (runner.py send from an extracted bundle) and the CLI's errors.

The run is the toy of test_bundle (a hand-built int8 ONNX encoder, Gaussian release noise) plus a
hand-built float ONNX head (Flatten -> Gemm), so everything here takes seconds. A real uvicorn
server listens on 127.0.0.1 (port chosen by the OS) in a thread; requests go through urllib with
timeouts. The browser page on a real QAT run is in test_serve_browser.py.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from qdefend.devices.bundle import extract_bundle, make_bundle
from qdefend.edge import wire
from qdefend.edge.client import Client, ClientError
from qdefend.edge.manifest import artifact_entry, load_manifest, write_manifest
from qdefend.edge.runtime import Runtime
from qdefend.errors import QdefendError
from qdefend.serve.service import ServeConfig, Service
from test_bundle import FEAT, toy_run

pytestmark = pytest.mark.usefixtures("one_thread")
TOKEN = "s3cret-token-for-tests-0123456789"
CLASSES = [f"class{i}" for i in range(10)]


def toy_served_run(root: Path, seed: int = 1, test_acc: float | None = None) -> Path:
    """The toy run of test_bundle plus a float ONNX head (weights from `seed`) and a verified
    manifest (recording `test_acc` for the head when given: a model-zoo member)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    toy_run(root)
    d = int(np.prod(FEAT))
    w = np.random.default_rng(seed).normal(0, 0.3, (d, 10)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["z"], ["f"]), helper.make_node("Gemm", ["f", "w", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", *FEAT])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(10, np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10),
              root / "artifacts" / "head.float.onnx")
    m = load_manifest(root)
    m["artifacts"]["head.float.onnx"] = artifact_entry(
        root, "artifacts/head.float.onnx", format="onnx", role="head", precision="float",
        input={"name": "z", "shape": [None, *FEAT], "dtype": "float32", "quant": None},
        output={"name": "logits", "shape": [None, 10], "dtype": "float32", "quant": None})
    m["dataset"]["class_names"] = CLASSES
    m["verification"] = {"status": "verified"}
    if test_acc is not None:
        m["verification"]["artifacts"] = {"head.float.onnx": {"test_acc": test_acc}}
    write_manifest(root, m)
    return root


class LiveServer:
    """uvicorn in a thread on 127.0.0.1, port from the OS; stopped by the fixture."""

    def __init__(self, app):
        import uvicorn

        # log_config=None: uvicorn leaves logging alone (its dictConfig would bind handlers to the
        # stream pytest captures for this test, closed by the next one)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None,
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert time.monotonic() - t0 < 20, "server did not start in 20 s"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return toy_served_run(tmp_path_factory.mktemp("serve") / "toy")


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("tok") / "token.txt"
    p.write_text(TOKEN + "\n")
    return p


@pytest.fixture(scope="module")
def server(run_dir, token_file):
    from qdefend.serve.app import create_app

    cfg = ServeConfig(run=str(run_dir), head="float", token_file=str(token_file), max_batch=16)
    s = LiveServer(create_app(cfg))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def encoded(run_dir):
    """(Runtime, Features) of 8 real test images through the toy encoder, release on, seed 0."""
    rt = Runtime.open(run_dir, "encoder.int8.onnx")
    from qdefend.data import reference_images

    images, _ = reference_images(run_dir, rt.manifest["input"]["shape"])
    return rt, images, rt.encode(images, seed=0)


def http(url, path, body=None, ctype=None, token=TOKEN, method=None, headers=None):
    """(status, parsed JSON or text) of one request, 10 s timeout."""
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    if ctype:
        h["Content-Type"] = ctype
    req = urllib.request.Request(url + path, data=body, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


# ------------------------------------------------------------------------------ the wire format


def test_binary_message_round_trips_and_is_compact():
    q = np.random.default_rng(0).integers(-128, 128, (3, *FEAT), dtype=np.int8)
    body = wire.pack(q, 1 / 256, -128, "ab" * 32)
    assert len(body) == wire.header_size(4) + q.size == 68 + q.size
    m = wire.unpack(body)
    assert np.array_equal(m.q, q) and m.scale == 1 / 256 and m.zero_point == -128 and m.encoder_sha256 == "ab" * 32
    j = wire.from_json(json.loads(json.dumps(wire.to_json(q, 1 / 256, -128, "ab" * 32))))
    assert np.array_equal(j.q, q) and j.scale == m.scale


@pytest.mark.parametrize("mangle, words", [
    (lambda b: b[:20], "shorter than the 52-byte header"),
    (lambda b: b"XXXX" + b[4:], "does not start with"),
    (lambda b: b[:4] + b"\x03" + b[5:], "version 3"),
    (lambda b: b[:5] + b"\x07" + b[6:], "dtype code 7"),
    (lambda b: b[:6] + b"\x09" + b[7:], "ndim 9"),
    (lambda b: b[:-1], "needs 588 bytes"),
    (lambda b: b + b"\x00", "needs 588 bytes"),
    (lambda b: b[:8] + np.float64(-1).tobytes() + b[16:], "scale must be"),
    (lambda b: b[:16] + np.int32(300).tobytes() + b[20:], "zero_point must be"),
])
def test_malformed_binary_messages_name_the_field(mangle, words):
    body = wire.pack(np.zeros((3, *FEAT), np.int8), 1 / 256, -128, "ab" * 32)
    with pytest.raises(wire.WireError, match=words):
        wire.unpack(mangle(body))


@pytest.mark.parametrize("edit, words", [
    ({"shape": "x"}, "shape must be"), ({"features": [1, 2]}, "flat list of 196"),
    ({"features": [300] * 196}, "integers in"), ({"encoder_sha256": "zz"}, "64 lowercase hex"),
    ({"dtype": "float32"}, "not supported"), ({"scale": 0}, "scale must be"),
])
def test_malformed_json_messages_name_the_field(edit, words):
    doc = dict(wire.to_json(np.zeros((1, *FEAT), np.int8), 1 / 256, -128, "ab" * 32), **edit)
    with pytest.raises(wire.WireError, match=words):
        wire.from_json(doc)
    with pytest.raises(wire.WireError, match="lacks features"):
        wire.from_json({k: v for k, v in doc.items() if k != "features"})


def test_pack_refuses_what_is_not_int8_codes():
    with pytest.raises(wire.WireError, match="int8 codes"):
        wire.pack(np.zeros((1, 4), np.float32), 0.1, 0, "ab" * 32)
    with pytest.raises(wire.WireError, match="64 lowercase hex"):
        wire.pack(np.zeros((1, 4), np.int8), 0.1, 0, "abc")


# ------------------------------------------------------------------------------ the service


def test_service_answers_what_the_local_head_answers(run_dir, encoded):
    rt, _, f = encoded
    svc = Service(run_dir, head="float")
    res = svc.infer(wire.Message(f.q, f.scale, f.zero_point, rt.entry["sha256"]))
    local = Runtime.open(run_dir, "head.float.onnx").run(f.dequantize())
    assert res["labels"] == local.argmax(1).tolist()
    assert res["classes"] == [CLASSES[i] for i in res["labels"]]
    assert np.allclose(np.sum(res["probabilities"], 1), 1, atol=1e-5)


def test_service_refuses_a_run_without_a_head_or_an_export(run_dir, tmp_path):
    with pytest.raises(QdefendError, match="no head.int8.onnx"):
        Service(run_dir, head="int8")
    with pytest.raises(QdefendError, match="no manifest.json: export it first"):
        Service(tmp_path)


def test_serve_config_errors_say_what_to_do(tmp_path):
    with pytest.raises(QdefendError, match="needs a bearer token"):
        ServeConfig(run="r")
    with pytest.raises(QdefendError, match="loopback only"):
        ServeConfig(run="r", insecure_no_auth=True, host="0.0.0.0")
    with pytest.raises(QdefendError, match="--port"):
        ServeConfig(run="r", insecure_no_auth=True, port=70000)
    (tmp_path / "t").write_text("short")
    with pytest.raises(QdefendError, match=">= 16 characters"):
        ServeConfig(run="r", token_file=str(tmp_path / "t")).read_token()


# ------------------------------------------------------------------------------ HTTP on loopback


def test_binary_and_json_requests_get_the_local_heads_labels(server, run_dir, encoded):
    rt, _, f = encoded
    sha = rt.entry["sha256"]
    want = Runtime.open(run_dir, "head.float.onnx").run(f.dequantize()).argmax(1).tolist()
    s, res = http(server.url, "/v1/infer", wire.pack(f.q, f.scale, f.zero_point, sha), wire.BINARY_TYPE)
    assert s == 200 and res["labels"] == want and res["encoder"] == "encoder.int8.onnx"
    s, res = http(server.url, "/v1/infer", json.dumps(wire.to_json(f.q, f.scale, f.zero_point, sha)).encode(),
                  "application/json; charset=utf-8")
    assert s == 200 and res["labels"] == want


def test_manifest_tells_a_client_what_to_run(server, run_dir):
    s, m = http(server.url, "/v1/manifest")
    full = load_manifest(run_dir)
    assert s == 200 and m["encoders"]["encoder.int8.onnx"]["sha256"] == full["artifacts"]["encoder.int8.onnx"]["sha256"]
    assert m["release"] == full["release"] and m["features"]["wire"] == full["features"]["wire"]
    assert m["input"]["normalization"] == full["input"]["normalization"] and m["limits"]["max_batch"] == 16


def _bad_requests(f, sha):
    ok = wire.pack(f.q[:2], f.scale, f.zero_point, sha)
    return {
        "no token": (dict(body=ok, ctype=wire.BINARY_TYPE, token=None), 401, "missing bearer token"),
        "wrong token": (dict(body=ok, ctype=wire.BINARY_TYPE, token="x" * 32), 401, "wrong bearer token"),
        "content type": (dict(body=ok, ctype="text/plain"), 415, "not a features message"),
        "garbage": (dict(body=b"\x00" * 80, ctype=wire.BINARY_TYPE), 400, "does not start with"),
        "bad json": (dict(body=b"{", ctype="application/json"), 400, "not valid JSON"),
        "oversized": (dict(body=b"\x00" * 2 * wire.max_body_bytes(FEAT, 16), ctype=wire.BINARY_TYPE), 413, "exceeds this server's limit"),
        "batch": (dict(body=wire.pack(np.zeros((17, *FEAT), np.int8), f.scale, f.zero_point, sha),
                       ctype=wire.BINARY_TYPE), 413, "outside 1..16"),
        "empty batch": (dict(body=wire.pack(np.zeros((0, *FEAT), np.int8), f.scale, f.zero_point, sha),
                             ctype=wire.BINARY_TYPE), 422, "outside 1..16"),
        "shape": (dict(body=wire.pack(f.q[:2, :2], f.scale, f.zero_point, sha), ctype=wire.BINARY_TYPE), 422,
                  "does not match this run's"),
        "grid": (dict(body=wire.pack(f.q[:2], f.scale * 2, f.zero_point, sha), ctype=wire.BINARY_TYPE), 422,
                 "differs from the manifest's wire"),
        "zero point": (dict(body=wire.pack(f.q[:2], f.scale, f.zero_point + 1, sha), ctype=wire.BINARY_TYPE), 422,
                       "differs from the manifest's wire"),
        "encoder": (dict(body=wire.pack(f.q[:2], f.scale, f.zero_point, "0" * 64), ctype=wire.BINARY_TYPE), 409,
                    "update the device's bundle"),
        "method": (dict(method="GET"), 405, "not allowed"),
    }


@pytest.mark.parametrize("case", [
    "no token", "wrong token", "content type", "garbage", "bad json", "oversized", "batch", "empty batch", "shape",
    "grid", "zero point", "encoder", "method"])
def test_every_malformed_request_class_gets_a_4xx_with_a_one_line_reason(server, encoded, case):
    rt, _, f = encoded
    kwargs, status, words = _bad_requests(f, rt.entry["sha256"])[case]
    s, res = http(server.url, "/v1/infer", **kwargs)
    assert s == status, res
    assert isinstance(res, dict) and words in res["error"] and "\n" not in res["error"]
    assert "Traceback" not in res["error"]


def test_routes_auth_and_unknown_paths(server):
    assert http(server.url, "/v1/manifest", token=None)[0] == 401
    s, h = http(server.url, "/healthz", token=None)
    assert s == 200 and h["status"] == "ok" and h["head"] == "head.float.onnx"
    s, res = http(server.url, "/v1/nothing")
    assert s == 404 and "no route /v1/nothing" in res["error"]
    s, res = http(server.url, "/v1/encoder/head.float.onnx")
    assert s == 404 and "no encoder artifact" in res["error"]
    s, res = http(server.url, "/static/../../etc/passwd", token=None)
    assert s == 404


def test_encoder_download_and_reference_match_the_manifest(server, run_dir):
    import hashlib

    req = urllib.request.Request(server.url + "/v1/encoder/encoder.int8.onnx", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        data = r.read()
    assert hashlib.sha256(data).hexdigest() == load_manifest(run_dir)["artifacts"]["encoder.int8.onnx"]["sha256"]
    s, ref = http(server.url, "/v1/reference")
    rt = Runtime.open(run_dir, "encoder.int8.onnx")
    images = np.asarray(ref["images"], np.uint8).reshape(ref["shape"])
    assert s == 200 and rt.encode(images, release=False).q.reshape(-1).tolist() == ref["features"]


def test_metrics_count_requests_and_rejects(server, encoded):
    rt, _, f = encoded
    http(server.url, "/v1/infer", wire.pack(f.q[:1], f.scale, f.zero_point, "0" * 64), wire.BINARY_TYPE)
    http(server.url, "/v1/infer", wire.pack(f.q[:3], f.scale, f.zero_point, rt.entry["sha256"]), wire.BINARY_TYPE)
    s, text = http(server.url, "/metrics", token=None)
    assert s == 200
    lines = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert lines['qdefend_rejects_total{reason="encoder"}'] >= 1
    assert lines['qdefend_requests_total{route="/v1/infer",status="200"}'] >= 1
    assert lines["qdefend_inferred_samples_total"] >= 3
    assert lines['qdefend_request_latency_seconds_count{route="/v1/infer"}'] >= 2


# ------------------------------------------------------------------------------ the device client


def test_client_errors_are_one_line(server, encoded):
    rt, _, f = encoded
    with pytest.raises(ClientError, match="HTTP 401: wrong bearer token"):
        Client(server.url, token="y" * 20).manifest()
    with pytest.raises(ClientError, match="did not export"):
        Client(server.url, token=TOKEN).check_encoder("1" * 64)
    with pytest.raises(ClientError, match="must look like http"):
        Client("ftp://x")
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(ClientError, match="cannot reach"):
        Client(f"http://127.0.0.1:{port}", timeout=5).manifest()


def test_runner_send_from_an_extracted_bundle_matches_the_local_pipeline(server, run_dir, encoded, token_file,
                                                                         tmp_path):
    rt, images, _ = encoded
    archive = make_bundle(run_dir, "rpi5", fmt="onnx", out=tmp_path / "b")
    root = extract_bundle(archive, tmp_path / "x")
    np.save(tmp_path / "imgs.npy", images)
    cmd = [sys.executable, str(root / "runner.py"), "send", str(tmp_path / "imgs.npy"), "--url", server.url,
           "--token-file", str(token_file), "--seed", "0"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    local = Runtime.open(run_dir, "head.float.onnx").run(rt.encode(images, seed=0).dequantize()).argmax(1)
    assert res["ok"] and [a["label"] for a in res["answers"]] == local.tolist()
    assert res["bytes_sent"] == images.shape[0] * int(np.prod(FEAT))
    bad = subprocess.run(cmd[:-4] + ["--token-file", str(tmp_path / "missing")], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "cannot read the token file" in bad.stderr


# ------------------------------------------------------------------------------ the CLI, as a user meets it


def _qdefend(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "qdefend.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, words", [
    (["--insecure-no-auth", "--host", "0.0.0.0"], "loopback only"),
    ([], "needs a bearer token"),
    (["--insecure-no-auth", "--head", "int9"], "--head"),
    (["--insecure-no-auth", "--workers", "0"], "--workers"),
])
def test_cli_refuses_bad_settings_on_one_line(run_dir, args, words):
    p = _qdefend("serve", run_dir, *args)
    assert p.returncode == 2 and words in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr


def test_cli_refuses_an_unexported_run_and_a_busy_port(run_dir, tmp_path):
    p = _qdefend("serve", tmp_path, "--insecure-no-auth")
    assert p.returncode == 2 and "export it first" in p.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        p = _qdefend("serve", run_dir, "--insecure-no-auth", "--head", "float", "--port", s.getsockname()[1])
    assert p.returncode == 2 and "cannot listen on 127.0.0.1" in p.stderr.splitlines()[-1]


def _spawn(run_dir, token_file, *args, stdout=subprocess.DEVNULL):
    """(process, port) of `qdefend serve` (float head) on a free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qdefend.cli", "serve", str(run_dir), "--head", "float",
                             "--port", str(port), "--token-file", str(token_file), *args],
                            stdout=stdout, stderr=subprocess.PIPE, text=True)
    return proc, port


def test_served_process_answers_stops_gracefully_and_never_logs_features(run_dir, token_file, encoded):
    rt, _, f = encoded
    proc, port = _spawn(run_dir, token_file, stdout=subprocess.PIPE)
    try:
        c = Client(f"http://127.0.0.1:{port}", token=TOKEN, timeout=10)
        t0 = time.monotonic()
        while True:
            try:
                c.manifest()
                break
            except ClientError:
                assert proc.poll() is None and time.monotonic() - t0 < 60, "server did not come up"
                time.sleep(0.2)
        ans = c.infer(f, encoder_sha256=rt.entry["sha256"])
        assert len(ans["labels"]) == len(f)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    # uvicorn drains in-flight requests, then re-raises the signal: exit by SIGTERM after a clean shutdown
    assert proc.returncode in (0, -signal.SIGTERM) and "Finished server process" in err, err
    logged = out + err
    assert "POST /v1/infer" in logged  # the access log is on ...
    assert str(f.q.reshape(-1)[:16].tolist())[1:-1] not in logged  # ... and holds no feature bytes
    assert f.q.tobytes()[:32].hex() not in logged


def test_two_workers_share_the_port_and_their_metrics(run_dir, token_file, encoded):
    rt, _, f = encoded
    proc, port = _spawn(run_dir, token_file, "--workers", "2")
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while http_ok(url) is False:
            assert proc.poll() is None and time.monotonic() - t0 < 90, "workers did not come up"
            time.sleep(0.2)
        body = wire.pack(f.q[:2], f.scale, f.zero_point, rt.entry["sha256"])
        pids = set()
        for _ in range(40):  # a new connection each: the kernel spreads them over the workers
            assert http(url, "/v1/infer", body, wire.BINARY_TYPE)[0] == 200
            pids.add(http(url, "/healthz", token=None)[1]["pid"])
        _, text = http(url, "/metrics", token=None)
        count = sum(float(ln.split(" ")[1]) for ln in text.splitlines()
                    if ln.startswith('qdefend_requests_total{route="/v1/infer",status="200"}'))
        assert count == 40, text  # summed over both workers' files, whichever answered /metrics
        workers = [d for d in os.listdir("/proc") if d.isdigit() and _ppid(d) == proc.pid]
        assert len(workers) >= 2 and pids <= {int(w) for w in workers}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def _ppid(pid: str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def http_ok(url) -> bool:
    try:
        return http(url, "/healthz", token=None)[0] == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def test_serving_benchmark_smoke_writes_its_json(run_dir, tmp_path):
    """benchmarks/serving.py on the toy run, tiny windows: the schema, every answer right, no silent
    loss over a restart, the fault classes' statuses (no timing asserted)."""
    out = tmp_path / "serving.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serving.py"
    p = subprocess.run([sys.executable, str(script), str(run_dir), "--seconds", "0.5", "--warmup", "0.2",
                        "--concurrency", "1,4", "--head", "float", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["machine"]["cpu"] and [lv["clients"] for lv in res["levels"]] == [1, 4]
    for lv in res["levels"]:
        assert set(lv["outcomes"]) == {"ok"} and lv["requests_per_s"] > 0 and lv["latency_ms"]["p99"] >= lv["latency_ms"]["p50"]
    r = res["restart"]
    assert r["silent"] == 0 and r["answered"] + r["explicit_errors"] == r["requests"] and r["answered"] > 0
    assert 0 <= r["in_flight_answered"] <= r["in_flight_at_sigterm"]  # drained or an explicit error, never silent
    statuses = {k: v["status"] for k, v in res["faults"].items()}
    assert statuses == {"unauthenticated": 401, "wrong_token": 401, "malformed": 400, "oversized": 413,
                        "wrong_shape": 422, "wrong_grid": 422, "unknown_encoder": 409, "content_type": 415}


def test_the_workers_listening_socket_gives_connections_tcp_nodelay():
    """With --workers N the socket is ours (uvicorn's own gave accepted connections no TCP_NODELAY,
    so each keep-alive answer waited for a delayed ACK); checked on a real asyncio server."""
    import asyncio

    from qdefend.serve.app import _listen_socket

    sock = _listen_socket("127.0.0.1", 0)
    seen = []

    async def main():
        def on_conn(reader, writer):
            s = writer.get_extra_info("socket")
            seen.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_conn, sock=sock)
        port = sock.getsockname()[1]
        _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        w.close()
        server.close()

    asyncio.run(main())
    assert seen and seen[0] != 0
