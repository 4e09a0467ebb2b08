"""PSML on Fashion-MNIST: a served model zoo, its fingerprint-then-extract attack, and the noise defense.

    python benchmarks/psml.py [--runs-dir runs/psml] [--out benchmarks/results/psml] [--budget 5000]
        [--scales 0.01,0.02,0.03,0.05,0.08,0.12,0.2] [--load-requests 1500] [--clients 2] [--size full|quick]
        [--threads 1] [--pins steady,center] [--force]

The zoo: four int8 QAT heads over one int8 encoder (``qdefend serve --zoo``). ``base`` is the
reference split trained on few images (``data.limit_train`` 3,000, 1 epoch), which makes the
encoder; ``low``, ``mid``, ``high`` and ``top`` are head-only fine-tunes of it (``--from base
--set train.freeze=encoder``; their exported encoders are byte-identical to base's) on 1,500,
8,000, 25,000 and all 50,000 training images (``top``: 2 epochs), so the heads differ in accuracy
and in their answers. Each run is trained and exported unless already done (``qdefend.stages``).

Each row starts a real server in this process (uvicorn on 127.0.0.1, port from the OS; the
operator's :class:`qdefend.serve.zoo.ZooEvaluator` scores the attack) and attacks it over HTTP
with KnockoffNets' default settings at ``--budget`` queries (random policy, aux pool, LeNet-style
clone), seed 0; fidelity is always measured against ``top`` (the zoo's most accurate head) on the
first 5,000 test images:

* ``single``: a zoo of ``top`` alone (the exposed single model, the upper bound);
* ``naive``: the four-head zoo, each request with targets drawn uniformly from the target box
  (accuracy in [0.5, 1], latency log-uniform in [0.05, 1000] ms; a refused draw is drawn again);
* ``fingerprint``: the four-head zoo, fingerprint (8 probes, majority of 3 asks per target) then
  extract at the pinned targets;
* ``defense@S``: the same attack on the zoo with ``--target-noise gaussian:S`` (accuracy noise of
  std S; latency untouched), by the default attacker (``pin=steady``: it measures which point of
  the victim's band answers steadiest) and by one that pins the band's middle (``pin=center``),
  and the zoo's goodput under a bounded loopback load measured first:
  ``--clients`` threads post ``--load-requests`` one-image requests, the users' accuracy targets
  uniform in [lowest head's accuracy - 0.05, highest head's], latency targets log-uniform in
  [5, 100] ms. ``goodput@0`` is the same load without noise.

Output under --out: ``psml.json`` (rows, the zoo's profiles, settings, machine), ``psml.md`` (the
README table) and ``psml.png`` (protection against goodput). Rows already in ``psml.json`` with
the same settings are kept (resumable); ``--force`` recomputes them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np

# run -> (training images, epochs, seed); "base" makes the encoder, the others are head-only fine-tunes of it
SIZES = {
    "full": {"runs": {"base": (3000, 1, 0), "low": (1500, 1, 1), "mid": (8000, 1, 1), "high": (25000, 1, 3),
                      "top": (None, 2, 2)}, "verify_images": None, "accuracy_range": [0.5, 1.0]},
    "quick": {"runs": {"base": (512, 1, 0), "low": (256, 1, 1), "mid": (512, 1, 1), "high": (1024, 1, 3),
                       "top": (2048, 1, 2)}, "verify_images": 500, "accuracy_range": [0.0, 1.0]},
}
ZOO = ("low", "mid", "high", "top")
ATTACKER = {"probes": 8, "repeats": 3}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, default=Path("runs/psml"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/psml"))
    p.add_argument("--budget", type=int, default=5000)
    p.add_argument("--scales", default="0.01,0.02,0.03,0.05,0.08,0.12,0.2")
    p.add_argument("--load-requests", type=int, default=1500)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--size", choices=tuple(SIZES), default="full")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pins", default="steady,center", help="defense rows: the attackers' pin choices")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    a.scales = [float(s) for s in a.scales.split(",") if s]
    a.pins = [s for s in a.pins.split(",") if s]
    return a


# ------------------------------------------------------------------------------ the zoo


def build_zoo(runs_dir: Path, size: str, say) -> dict[str, Path]:
    from qdefend.stages import ensure_exported, ensure_trained

    s = SIZES[size]
    roots = {k: runs_dir / k for k in s["runs"]}
    for name, (images, epochs, seed) in s["runs"].items():
        cfg = {"data": {"limit_train": images}, "train": {"epochs": epochs, "seed": seed}}
        if name != "base":
            cfg["init_from"] = str(roots["base"])
            cfg["train"]["freeze"] = "encoder"
        ensure_trained(roots[name], cfg, say=lambda m, n=name: say(f"{n}: {m}"))
        ensure_exported(roots[name], verify_images=s["verify_images"], say=lambda m, n=name: say(f"{n}: {m}"))
    return roots


class Server:
    """A zoo behind uvicorn in a thread on 127.0.0.1 (port from the OS)."""

    def __init__(self, members: list[str], noise: str | None, threads: int):
        import uvicorn

        from qdefend.serve.app import create_app
        from qdefend.serve.service import ServeConfig

        cfg = ServeConfig(run=members[0].rsplit(":", 1)[0], zoo=members, insecure_no_auth=True, threads=threads,
                          target_noise=noise, zoo_seed=0)
        app = create_app(cfg)
        self.zoo = app.state.service
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if time.monotonic() - t0 > 60:
                raise SystemExit("error: the zoo server did not start in 60 s")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


# ------------------------------------------------------------------------------ load and attack


def goodput_load(server: Server, base: Path, requests: int, clients: int, seed: int = 0) -> dict:
    """Bounded loopback load of one-image requests with users' targets; the server's goodput."""
    import http.client

    from qdefend.data import reference_images
    from qdefend.edge import wire
    from qdefend.edge.runtime import Runtime

    rt = Runtime.open(base, "encoder.int8.onnx")
    images, _ = reference_images(base, rt.manifest["input"]["shape"], n=66)
    f = rt.encode(images, seed=0)
    bodies = [wire.pack(f.q[i:i + 1], f.scale, f.zero_point, rt.entry["sha256"]) for i in range(len(f.q))]
    accs = [p.accuracy for p in server.zoo.policy.profiles]
    rng = np.random.default_rng(seed)
    targets = list(zip(rng.uniform(min(accs) - 0.05, max(accs), requests),
                       np.exp(rng.uniform(math.log(5), math.log(100), requests))))
    port = int(server.url.rsplit(":", 1)[1])
    before = server.zoo.goodput.snapshot()
    lat, errors, lock = [], [], threading.Lock()

    def client(c):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for i in range(c, requests, clients):
            a, ms = targets[i]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/infer", body=bodies[i % len(bodies)],
                             headers={"Content-Type": wire.BINARY_TYPE, "X-Qdefend-Accuracy": f"{a:.6f}",
                                      "X-Qdefend-Latency-Ms": f"{ms:.4f}"})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn, ok = http.client.HTTPConnection("127.0.0.1", port, timeout=10), False
            with lock:
                lat.append(time.perf_counter() - t0)
                if not ok:
                    errors.append(i)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    after = server.zoo.goodput.snapshot()
    d = {k: after[k] - before[k] for k in ("good", "missed_latency", "missed_accuracy", "refused", "requests")}
    return {**d, "goodput": d["good"] / max(d["requests"], 1), "requests_per_s": round(len(lat) / wall, 1),
            "client_p50_ms": round(1e3 * float(np.median(lat)), 3),
            "client_p99_ms": round(1e3 * float(np.percentile(lat, 99)), 3), "http_errors": len(errors),
            "clients": clients}


def agreement(server: Server, base: Path, data, n: int = 5000) -> list[float]:
    """Each member's top-1 agreement with the most accurate one on the first n test images."""
    from qdefend.edge.runtime import Runtime
    from qdefend.serve.zoo import ZooEvaluator

    ev = ZooEvaluator(server.zoo)
    rt = Runtime.open(base, "encoder.int8.onnx")
    f = rt.encode(data.test.floats(slice(0, n)), seed=0)
    labels = [ev.probabilities(m, f.q, f.scale, f.zero_point, rt.entry["sha256"]).argmax(1)
              for m in range(len(ev.names))]
    return [float((lab == labels[ev.most_accurate]).mean()) for lab in labels]


def attack(server: Server, base: Path, data, mode: str, budget: int, accuracy_range: list[float],
           pin: str = "steady") -> dict:
    from qdefend.attacks import build_attack
    from qdefend.attacks.zoo import open_zoo_target
    from qdefend.serve.zoo import ZooEvaluator

    target = open_zoo_target(base, f"zoo:{server.url}", truth=ZooEvaluator(server.zoo), deadline_s=1800)
    atk = build_attack("fingerprint", mode=mode, budgets=[budget], accuracy_range=accuracy_range, pin=pin,
                       **ATTACKER)
    t0 = time.perf_counter()
    res = atk.run(target, data, seed=0, progress=lambda m: print(f"    {m}", file=sys.stderr, flush=True))
    fp = res.extra.get("fingerprint") or {}
    share = None
    if fp.get("pinned"):  # the operator's view: how often the policy gives the best head at the pinned targets
        from qdefend.serve.zoo import SelectionPolicy, Targets

        pol = SelectionPolicy(server.zoo.policy.profiles, server.zoo.policy.noise, seed=1)
        t = Targets(fp["pinned"]["accuracy"], fp["pinned"]["latency_ms"], True)
        share = float(np.mean([pol.select(t) == target.truth.most_accurate for _ in range(4000)]))
    return {"mode": mode, "pin": pin, "clone_acc": res.metrics["clone_acc"], "fidelity": res.metrics["fidelity"],
            "victim_acc": res.metrics["victim_acc"], "queries": int(res.metrics["queries"]),
            "fingerprint_queries": int(res.metrics["fingerprint_queries"]),
            "identification_acc": res.metrics.get("identification_acc"),
            "victim_identified": res.metrics.get("victim_identified"),
            "pinned": fp.get("pinned"), "clusters": fp.get("clusters"), "pin_candidates": fp.get("pin_candidates"),
            "best_head_share_at_pin": share, "http_requests": target.requests, "wall_s": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------ output


def markdown(rows: dict, profiles: list[dict]) -> str:
    out = ["| zoo head | test accuracy (int8) | latency profile ms (measured) | top-1 agreement with the best |",
           "|---|---|---|---|"]
    out += [f"| `{p['name']}` | {100 * p['accuracy']:.2f}% | {p['latency_ms']:g} ({p['measured_ms']:.3f}) | "
            + (f"{100 * p['agreement_with_top']:.2f}% |" if "agreement_with_top" in p else "- |") for p in profiles]
    out += ["", "| attack | queries (fingerprint + extraction) | identification acc | clone acc | fidelity to top |",
            "|---|---|---|---|---|"]
    label = {"single": "single exposed model (`top` alone; upper bound)", "naive": "naive (random targets, mixed answers)",
             "fingerprint": "fingerprint then extract"}
    for key in ("single", "naive", "fingerprint"):
        r = rows.get(key)
        if r:
            ident = "-" if r["identification_acc"] is None else f"{100 * r['identification_acc']:.1f}%"
            out.append(f"| {label[key]} | {r['fingerprint_queries']} + {r['queries']} | {ident} | "
                       f"{100 * r['clone_acc']:.2f}% | {100 * r['fidelity']:.2f}% |")
    ref = rows.get("fingerprint")
    out += ["", "| target noise (gaussian, accuracy std) | goodput | steady pin: fidelity (cut) | clone acc (cut) | "
            "center pin: fidelity (cut) | clone acc (cut) | answers by the best head at the pin (steady / center) |",
            "|---|---|---|---|---|---|---|"]
    g0 = rows.get("goodput@0")

    def cell(r, key):
        cut = f" ({100 * (ref[key] - r[key]):+.2f})" if ref else ""
        return f"{100 * r[key]:.2f}%{cut}" + ("" if r.get("victim_identified") else " (victim missed)")

    if g0 and ref:
        out.append(f"| 0 | {100 * g0['goodput']:.1f}% | {100 * ref['fidelity']:.2f}% | {100 * ref['clone_acc']:.2f}% "
                   f"| (same) | (same) | 100% |")
    for key in defense_keys(rows):
        r, a = rows[key], rows[key]["attacks"]
        row = [f"{100 * r['goodput']['goodput']:.1f}%"]
        for pin in ("steady", "center"):
            row += [cell(a[pin], "fidelity"), cell(a[pin], "clone_acc")] if pin in a else ["-", "-"]
        shares = [a.get(pin, {}).get("best_head_share_at_pin") for pin in ("steady", "center")]
        row.append(" / ".join("-" if v is None else f"{100 * v:.0f}%" for v in shares))
        out.append(f"| {key.split('@')[1]} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def defense_keys(rows: dict) -> list[str]:
    return sorted((k for k in rows if k.startswith("defense@")), key=lambda k: float(k.split("@")[1]))


def plot(rows: dict, path: Path) -> Path | None:
    ref, g0 = rows.get("fingerprint"), rows.get("goodput@0")
    keys = defense_keys(rows)
    if not ref or not g0 or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gp = [100 * g0["goodput"]] + [100 * rows[k]["goodput"]["goodput"] for k in keys]
    labels = ["0"] + [k.split("@")[1] for k in keys]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for pin, color in (("steady", "C0"), ("center", "C1")):
        if not all(pin in rows[k]["attacks"] for k in keys):
            continue
        for metric, style, what in (("fidelity", "o-", "fidelity"), ("clone_acc", "s--", "clone accuracy")):
            cut = [0.0] + [100 * (ref[metric] - rows[k]["attacks"][pin][metric]) for k in keys]
            ax.plot(gp, cut, style, color=color, label=f"{what} cut, {pin} pin")
            if metric == "fidelity":
                for x, y, s in zip(gp, cut, labels):
                    ax.annotate(f"σ={s}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(80, color="grey", lw=0.8, ls=":")
    ax.axhline(4, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("goodput under load (%)")
    ax.set_ylabel("protection: drop vs. no noise (points)")
    ax.set_title("PSML target noise: protection vs goodput (Fashion-MNIST zoo)")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from qdefend.config import RunConfig
    from qdefend.data import load_dataset
    from qdefend.machine import load_average, machine_info

    torch.set_num_threads(args.threads)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    roots = build_zoo(args.runs_dir, args.size, say)
    members = [f"{roots[k]}:int8" for k in ZOO]
    settings = {"size": args.size, "budget": args.budget, "attacker": ATTACKER, "load_requests": args.load_requests,
                "clients": args.clients, "threads": args.threads, "members": members, "pins": args.pins}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "psml.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    rows = old.get("rows", {}) if old.get("settings") == settings and not args.force else {}
    data = load_dataset(RunConfig.load(roots["top"] / "config.toml").data)

    def save(profiles):
        res = {"benchmark": "qdefend.psml", "schema_version": 1,
               "command": " ".join(["python", "benchmarks/psml.py", *(argv if argv is not None else sys.argv[1:])]),
               "settings": settings, "zoo": profiles, "rows": rows, "machine": machine_info(),
               "load_average": load_average(), "wall_s": round(time.perf_counter() - t_start, 1)}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
        tmp.replace(path)

    jobs = [("single", [members[-1]], None, "naive"), ("naive", members, None, "naive"),
            ("fingerprint", members, None, "fingerprint"), ("goodput@0", members, None, None)]
    jobs += [(f"defense@{s:g}", members, f"gaussian:{s:g}", "fingerprint") for s in args.scales]
    profiles = old.get("zoo") if rows else None
    if profiles and "agreement_with_top" not in profiles[0]:  # made before agreement was measured
        rows.pop("fingerprint", None)
    for key, zoo_members, noise, mode in jobs:
        if key in rows:
            say(f"[{key}] kept from {path}")
            continue
        say(f"[{key}] serving {len(zoo_members)} head(s), noise {noise or 'none'}")
        server = Server(zoo_members, noise, args.threads)
        try:
            if len(zoo_members) == len(members) and noise is None:
                profiles = server.zoo.describe()["members"]
                for prof, agree in zip(profiles, agreement(server, roots["base"], data)):
                    prof["agreement_with_top"] = agree
            rng_acc = SIZES[args.size]["accuracy_range"]
            served = [{k: m[k] for k in ("name", "accuracy", "latency_ms", "measured_ms")}
                      for m in server.zoo.describe()["members"]]
            if profiles and len(served) == len(profiles) and [m["latency_ms"] for m in served] != [
                    m["latency_ms"] for m in profiles]:
                say(f"[{key}] WARNING: latency profiles {[m['latency_ms'] for m in served]} differ from the "
                    "reference zoo's: this row's policy orders the heads differently (raise --latency-resolution-ms)")
            if mode is None or noise is not None:
                gp = goodput_load(server, roots["base"], args.load_requests, args.clients)
                say(f"[{key}] goodput {gp['goodput']:.3f} ({gp})")
            if mode is None:
                rows[key] = {**gp, "profiles": served}
            elif noise is None:
                rows[key] = {**attack(server, roots["base"], data, mode, args.budget, rng_acc), "profiles": served}
                say(f"[{key}] {rows[key]}")
            else:  # the defense: the steady-pin attacker (default) and one that pins the band's middle
                rows[key] = {"goodput": gp, "profiles": served, "attacks": {
                    pin: attack(server, roots["base"], data, mode, args.budget, rng_acc, pin) for pin in args.pins}}
                say(f"[{key}] {rows[key]['attacks']}")
        finally:
            server.stop()
        save(profiles)
    md = markdown(rows, profiles or [])
    (args.out / "psml.md").write_text(md)
    png = plot(rows, args.out / "psml.png")
    save(profiles)
    print(md)
    print(f"wrote {path}, {args.out / 'psml.md'}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
