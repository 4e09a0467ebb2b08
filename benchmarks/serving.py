"""Load and faults of `qdefend serve` on loopback: throughput and latency at 1/8/64 concurrent
clients, a restart under load, and the status of each malformed-request class.

    python benchmarks/serving.py runs/demo [--seconds 5] [--concurrency 1,8,64] [--workers 1]
        [--batch 1] [--browser] [--out benchmarks/results/serving.json]

The server is a real `qdefend serve` process (uvicorn, ONNX Runtime head) on 127.0.0.1 with a
bearer token; each client is a thread with its own keep-alive HTTP connection posting the binary
features message of real released test images (the run's own Python runtime encodes them), and
checks every answer against the local head. Per level: a warm-up, then a fixed wall-clock window;
requests/s, samples/s and p50/p90/p99 latency. The baseline in the same run is the service's own
work without HTTP (`Service.infer` in-process, one thread), so `http_overhead` says what the
transport costs. Restart: clients keep posting while the server gets SIGTERM (uvicorn drains what
it accepted) and a new one starts on the same port; every request must end as a correct answer or
an explicit error (refused/reset connection, 5xx, timeout): `silent` (a wrong 200) must be 0.
`--browser` also opens the phone-browser page in headless Chromium (the encoder in wasm, one
thread): int8 parity with the Python runtimes, encode time in the page and the round trip.
JSON output records the machine (CPU flags) and load average. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from qdefend.data import reference_images
from qdefend.edge import wire
from qdefend.edge.manifest import load_manifest
from qdefend.edge.release import wire_dequantize
from qdefend.edge.runtime import Runtime
from qdefend.machine import load_average, machine_info
from qdefend.serve.service import Service

TOKEN = "benchmark-token-" + os.urandom(8).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, token_file: Path, workers: int, head: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "qdefend.cli", "serve", str(run), "--port", str(port),
                             "--token-file", str(token_file), "--workers", str(workers), "--head", head],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited: {proc.stderr.read().strip().splitlines()[-1:]}")
        if time.monotonic() - t0 > 120:
            proc.kill()
            raise SystemExit("error: the server did not come up in 120 s")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class Bodies:
    """Binary request bodies of real released features, and the labels the local head gives them."""

    def __init__(self, run: Path, batch: int, head: str, n: int = 64):
        arts = load_manifest(run)["artifacts"]
        enc = Runtime.open(run, "encoder.int8.onnx" if "encoder.int8.onnx" in arts else "encoder.int8.tflite")
        images, _ = reference_images(run, enc.manifest["input"]["shape"], n=n + 2)
        f = enc.encode(images, seed=0)
        sha = enc.entry["sha256"]
        head_rt = Runtime.open(run, f"head.{head}.onnx")
        self.bodies, self.labels, self.messages = [], [], []
        for i in range(0, len(f.q) - batch + 1, batch):
            q = f.q[i:i + batch]
            self.bodies.append(wire.pack(q, f.scale, f.zero_point, sha, bits=f.bits))
            self.messages.append(wire.Message(q, f.scale, f.zero_point, sha, f.bits))
            self.labels.append(head_rt.run(wire_dequantize(q, {"scale": f.scale, "zero_point": f.zero_point}))
                               .argmax(1).tolist())


def post(conn: http.client.HTTPConnection, body: bytes, token: str = TOKEN, ctype: str = wire.BINARY_TYPE):
    conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": ctype, "Authorization": f"Bearer {token}"})
    r = conn.getresponse()
    return r.status, r.read()


def client_loop(port: int, bodies: Bodies, stop: threading.Event, out: list, offset: int, retry: bool = False):
    """Post until `stop`; append (t_start, latency_s, outcome) per request; outcome is 'ok',
    'wrong' (a 200 whose labels differ from the local head's), 'http_NNN' or an exception name."""
    conn, i = None, offset
    while not stop.is_set():
        k = i % len(bodies.bodies)
        i += 1
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            status, raw = post(conn, bodies.bodies[k])
            if status == 200:
                outcome = "ok" if json.loads(raw)["labels"] == bodies.labels[k] else "wrong"
            else:
                outcome = f"http_{status}"
        except (OSError, http.client.HTTPException) as e:
            outcome = type(e).__name__
            if conn is not None:
                conn.close()
            conn = None
            if retry:
                time.sleep(0.02)
        out.append((t0, time.perf_counter() - t0, outcome))
    if conn is not None:
        conn.close()


def load_level(port: int, bodies: Bodies, clients: int, seconds: float, warmup: float) -> dict:
    stop, results = threading.Event(), [[] for _ in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(port, bodies, stop, results[c], c * 7)) for c in range(clients)]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(warmup + seconds)
    stop.set()
    for t in threads:
        t.join(60)
    lo, hi = t_start + warmup, t_start + warmup + seconds
    window = [r for rs in results for r in rs if lo <= r[0] < hi]
    ok = [r[1] for r in window if r[2] == "ok"]
    lat = np.asarray(ok) * 1e3 if ok else np.asarray([np.nan])
    outcomes: dict[str, int] = {}
    for r in window:
        outcomes[r[2]] = outcomes.get(r[2], 0) + 1
    batch = bodies.messages[0].q.shape[0]
    return {"clients": clients, "seconds": seconds, "requests": len(window), "outcomes": outcomes,
            "requests_per_s": round(len(ok) / seconds, 1), "samples_per_s": round(len(ok) * batch / seconds, 1),
            "latency_ms": {p: round(float(np.percentile(lat, q)), 3) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}}


def baseline(run: Path, bodies: Bodies, head: str, seconds: float) -> dict:
    """The service's work without HTTP: check + dequantise + head + softmax, one thread, in-process."""
    svc = Service(run, head=head, threads=1)
    for m in bodies.messages[:20]:
        svc.infer(m)
    n, t0, times = 0, time.perf_counter(), []
    while time.perf_counter() - t0 < seconds:
        t1 = time.perf_counter()
        svc.infer(bodies.messages[n % len(bodies.messages)])
        times.append(time.perf_counter() - t1)
        n += 1
    return {"requests_per_s": round(n / (time.perf_counter() - t0), 1),
            "latency_ms": {"p50": round(float(np.median(times)) * 1e3, 4)}}


def restart_under_load(run: Path, port: int, proc: subprocess.Popen, token_file: Path, bodies: Bodies, workers: int,
                       head: str, clients: int = 8, before: float = 1.5, after: float = 2.0) -> tuple[dict, subprocess.Popen]:
    stop, results = threading.Event(), [[] for _ in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(port, bodies, stop, results[c], c, True)) for c in range(clients)]
    for t in threads:
        t.start()
    time.sleep(before)
    t_term = time.perf_counter()
    rc = stop_server(proc)
    t_down = time.perf_counter()
    proc = start_server(run, port, token_file, workers, head)
    t_up = time.perf_counter()
    time.sleep(after)
    stop.set()
    for t in threads:
        t.join(60)
    rs = [r for rr in results for r in rr]
    outcomes: dict[str, int] = {}
    for r in rs:
        outcomes[r[2]] = outcomes.get(r[2], 0) + 1
    in_flight = [r for r in rs if r[0] < t_term < r[0] + r[1]]
    errors = sum(v for k, v in outcomes.items() if k not in ("ok", "wrong"))
    return {"clients": clients, "requests": len(rs), "outcomes": outcomes, "answered": outcomes.get("ok", 0),
            "explicit_errors": errors, "silent": outcomes.get("wrong", 0),
            "in_flight_at_sigterm": len(in_flight), "in_flight_answered": sum(r[2] == "ok" for r in in_flight),
            "old_server_exit": rc, "drain_s": round(t_down - t_term, 3), "restart_s": round(t_up - t_down, 3)}, proc


def faults(port: int, bodies: Bodies) -> dict:
    """The status each malformed-request class gets (the tests assert them; recorded here too)."""
    good = bodies.bodies[0]
    m = bodies.messages[0]
    cases = {
        "unauthenticated": (good, "", wire.BINARY_TYPE),
        "wrong_token": (good, "x" * 32, wire.BINARY_TYPE),
        "malformed": (b"QDF1" + b"\x00" * 10, TOKEN, wire.BINARY_TYPE),
        "oversized": (b"\x00" * 4_000_000, TOKEN, wire.BINARY_TYPE),
        "wrong_shape": (wire.pack(m.q[:, :1], m.scale, m.zero_point, m.encoder_sha256), TOKEN, wire.BINARY_TYPE),
        "wrong_grid": (wire.pack(m.q, m.scale * 2, m.zero_point, m.encoder_sha256), TOKEN, wire.BINARY_TYPE),
        "unknown_encoder": (wire.pack(m.q, m.scale, m.zero_point, "0" * 64), TOKEN, wire.BINARY_TYPE),
        "content_type": (good, TOKEN, "text/plain"),
    }
    out = {}
    for name, (body, token, ctype) in cases.items():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            headers = {"Content-Type": ctype, **({"Authorization": f"Bearer {token}"} if token else {})}
            conn.request("POST", "/v1/infer", body=body, headers=headers)
            r = conn.getresponse()
            reason = json.loads(r.read()).get("error", "")
            out[name] = {"status": r.status, "error": reason}
        except (OSError, http.client.HTTPException) as e:
            out[name] = {"status": None, "error": f"{type(e).__name__} (connection closed before the answer)"}
        finally:
            conn.close()
    return out


JS_TIMED = """(async () => {
  const px = Uint8Array.from(atob("%s"), c => c.charCodeAt(0));
  const n = %d, per = px.length / n, enc = [], rtt = [];
  let codes = [];
  for (let r = 0; r < %d; r++) for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    const f = await qdefend.encodePixels(px.subarray(i * per, (i + 1) * per), 1, {release: false});
    const t1 = performance.now();
    await qdefend.infer(f);
    enc.push(t1 - t0); rtt.push(performance.now() - t0);
    if (r === 0) codes = codes.concat(Array.from(f.q));
  }
  return {enc, rtt, codes};
})()"""


def browser_check(url: str, run: Path, repeats: int = 3) -> dict:
    """The phone-browser page in headless Chromium: int8 parity with the Python runtimes on the
    reference images, per-image encode time in the page (wasm, 1 thread) and the encode + POST
    round trip, medians."""
    import base64

    from qdefend.serve.browser import Chromium

    arts = load_manifest(run)["artifacts"]
    images, _ = reference_images(run, load_manifest(run)["input"]["shape"], n=66)
    with Chromium(timeout=120) as b:
        t0 = time.perf_counter()
        b.goto(f"{url}/#token={TOKEN}", ready="!!(window.qdefend && window.qdefend.state.session)")
        start_s = time.perf_counter() - t0
        out = b.evaluate(JS_TIMED % (base64.b64encode(images.tobytes()).decode(), len(images), repeats), timeout=600)
        version = b.evaluate("navigator.userAgent", await_promise=False)
    q = np.asarray(out["codes"], np.int16).reshape(len(images), -1)
    parity = {}
    for name in ("encoder.int8.onnx", "encoder.int8.tflite"):
        if name in arts:
            ref = Runtime.open(run, name).encode(images, release=False).q.reshape(len(images), -1).astype(np.int16)
            d = np.abs(q - ref)
            parity[name] = {"values": int(d.size), "mismatches": int((d > 0).sum()), "max_abs_lsb": int(d.max())}
    return {"browser": version, "images": len(images), "repeats": repeats, "page_start_s": round(start_s, 3),
            "encode_ms_p50": round(float(np.median(out["enc"])), 3),
            "round_trip_ms_p50": round(float(np.median(out["rtt"])), 3),
            "round_trip_ms_p99": round(float(np.percentile(out["rtt"], 99)), 3), "parity_vs_python": parity}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="an exported run, e.g. runs/demo")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured window per concurrency level")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="samples per request")
    ap.add_argument("--head", default="int8", choices=("int8", "float"))
    ap.add_argument("--no-restart", action="store_true", help="skip the restart-under-load check")
    ap.add_argument("--browser", action="store_true", help="also run the phone-browser page in headless Chromium")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    a = ap.parse_args(argv)
    if not (a.run / "manifest.json").is_file():
        print(f"error: {a.run} has no manifest.json: export it first with `qdefend export {a.run}`", file=sys.stderr)
        return 2
    levels = [int(c) for c in a.concurrency.split(",")]
    res = {"benchmark": "serving", "run": str(a.run), "machine": machine_info(), "load_average_start": load_average(),
           "settings": {"seconds": a.seconds, "warmup": a.warmup, "workers": a.workers, "batch": a.batch,
                        "head": a.head, "transport": "HTTP/1.1 keep-alive, one connection per client thread"}}
    bodies = Bodies(a.run, a.batch, a.head)
    res["request_bytes"] = len(bodies.bodies[0])
    res["baseline_in_process"] = baseline(a.run, bodies, a.head, min(a.seconds, 3.0))
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token.txt"
        token_file.write_text(TOKEN)
        port = free_port()
        proc = start_server(a.run, port, token_file, a.workers, a.head)
        try:
            res["levels"] = []
            for c in levels:
                lv = load_level(port, bodies, c, a.seconds, a.warmup)
                lv["http_overhead"] = round(res["baseline_in_process"]["requests_per_s"] / max(lv["requests_per_s"], 1e-9), 2)
                res["levels"].append(lv)
                print(f"{c:3d} clients: {lv['requests_per_s']:8.1f} req/s  p50 {lv['latency_ms']['p50']:7.2f} ms  "
                      f"p99 {lv['latency_ms']['p99']:7.2f} ms  {lv['outcomes']}", file=sys.stderr)
            res["faults"] = faults(port, bodies)
            if a.browser:
                res["browser"] = browser_check(f"http://127.0.0.1:{port}", a.run)
                print(f"browser: {res['browser']}", file=sys.stderr)
            if not a.no_restart:
                res["restart"], proc = restart_under_load(a.run, port, proc, token_file, bodies, a.workers, a.head)
                print(f"restart: {res['restart']}", file=sys.stderr)
        finally:
            stop_server(proc)
    res["load_average_end"] = load_average()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("levels", "baseline_in_process")}, indent=None)[:2000])
    ok = all(lv["outcomes"].get("wrong", 0) == 0 for lv in res["levels"]) and res.get("restart", {}).get("silent", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
