"""PSML on Fashion-MNIST: a served model zoo, its fingerprint-then-extract attack, and the noise defense.

    python benchmarks/psml.py [--runs-dir runs/psml] [--out benchmarks/results/psml] [--budget 5000]
        [--noises gaussian:0.02 ... drop:0.8,mid/image] [--attackers steady,center,vote3,filter,seq,tag]
        [--load-requests 1500]
        [--clients 2] [--size full|quick] [--threads 1] [--latency-resolution-ms 0.25] [--seeds 0,1,2]
        [--zoo low,mid,high,adam,top] [--force]

The zoo: int8 QAT heads over one int8 encoder (``qdefend serve --zoo``). ``base`` is the reference
split trained on few images (``data.limit_train`` 3,000, 1 epoch), which makes the encoder; every
member is a head-only fine-tune of it (``--from base --set train.freeze=encoder``; their exported
encoders are byte-identical to base's), see ``SIZES``: ``low``, ``mid``, ``high`` and ``top`` on
1,500, 8,000, 25,000 and all 50,000 training images with SGD, and ``adam``, all 50,000 images
with Adam (another optimizer and seed: a head about as accurate as ``top`` that disagrees with
it more than the nested-data heads do). ``--zoo`` serves other heads: ``upper`` (14,000 images,
SGD, another seed) sits between ``mid`` and ``high`` in accuracy (a drop level near 80%), and is
served only when named. Each run is trained and exported unless already done (``qdefend.stages``).

Each row starts a real server in this process (uvicorn on 127.0.0.1, port from the OS; the
operator's :class:`qdefend.serve.zoo.ZooEvaluator` scores the attack) and attacks it over HTTP
with KnockoffNets' default settings at ``--budget`` queries (random policy, aux pool, LeNet-style
clone), seed 0; fidelity is always to the zoo's most accurate head (the victim) on the first
5,000 test images:

* ``single``: a zoo of the most accurate head alone (the exposed single model, the upper bound),
  with a clone per budget in ``CURVE`` too (what fewer answers of the victim are worth);
* ``naive``: the whole zoo, each request with targets drawn uniformly from the target box
  (accuracy in [0.5, 1], latency log-uniform in [0.05, 1000] ms; a refused draw is drawn again);
* ``fingerprint``: the whole zoo, fingerprint (8 probes, majority of 3 asks per target, 16 single
  asks at the top of the served range and at each pin candidate: ``ATTACKER``) then extract at
  the pinned targets; ``fingerprint+vote3``: the same, each extraction image asked 3
  times and its most frequent answer kept (budget // 3 images);
* ``defense@SPEC``: the same attackers on the zoo with ``--target-noise SPEC`` (accuracy noise
  only; in ``drop:P,NAME`` the level is member NAME's profiled accuracy): ``steady`` (the default
  pin: the point of the victim's band that answers steadiest), ``center`` (pins the band's
  middle), ``vote3`` (steady pin, 3 asks an image), ``filter`` (steady pin, ``filter=auto``:
  each image asked R times at the pin plus once at a pin only a lower model answers, keeping the
  answers that differ from that model's), ``seq`` (steady pin, ``filter=seq``: the same, but each
  image asked at the pin only until an answer differs, for as many images as the budget lasts)
  and ``tag`` (steady pin, ``tag=true``: every request carries the 8 probes, whose answers name
  the head that answered it; the requests the victim answered are kept; see
  ``qdefend.attacks.extraction.fingerprint``). A noise spec ending in ``/image`` draws the noise
  per image (each image of a request answered by its own pick), which defeats the tag; there the
  attackers fingerprint with one probe image an ask (``ATTACKER_PER_IMAGE``), since 8 probes would
  come back from several heads at once and look like models never seen.
  Protection = the undefended ``fingerprint`` row minus the *best* of these attackers (the worst
  case for the defense). Goodput is measured first, under a bounded loopback load of
  legitimate users only: ``--clients`` threads post ``--load-requests`` one-image requests with
  accuracy targets uniform in [lowest head's accuracy - 0.05, highest head's] and latency
  targets log-uniform in [5, 100] ms. ``goodput@0`` is the same load without noise.

Output under --out: ``psml.json`` (rows, the zoo's profiles, settings, machine), ``psml.md`` (the
README tables) and ``psml.png`` (protection against goodput). Rows already in ``psml.json`` with
the same settings are kept (resumable); ``--force`` recomputes them.

``--seeds 0,1,2``: the defense's sweep over seeds instead (``psml-seeds.json``, ``.md``, ``.png``
beside the single-seed files, which it leaves alone). A seed s seeds the zoo's target noise
(``--zoo-seed``), the attack (its pool order and clone) and the users' load; per seed it runs
``goodput@0``, the undefended ``fingerprint`` attack (the seed's own reference) and the defense
rows with every attacker. The summary gives, per noise setting, mean ± sample std over the seeds
of the goodput and of the protection against the best attacker *of each seed*, and the worst
seed. The goal is met at a noise setting when the mean cut is >= 4 points and the mean goodput
>= 80%; the verdict also says how many seeds meet both on their own (the worst seed's figures).
Rows are kept per seed (resumable, ``--force`` recomputes).
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

_SGD = {"optimizer": "sgd", "lr": 0.05, "weight_decay": 0.0005}
_ADAM = {"optimizer": "adam", "lr": 0.001, "weight_decay": 0.0}
# run -> (training images, epochs, seed, optimizer settings); "base" makes the encoder, the others
# are head-only fine-tunes of it
SIZES = {
    "full": {"runs": {"base": (3000, 1, 0, _SGD), "low": (1500, 1, 1, _SGD), "mid": (8000, 1, 1, _SGD),
                      "upper": (14000, 1, 7, _SGD), "high": (25000, 1, 3, _SGD), "adam": (None, 2, 11, _ADAM),
                      "top": (None, 2, 2, _SGD)},
             "verify_images": None, "accuracy_range": [0.5, 1.0]},
    "quick": {"runs": {"base": (512, 1, 0, _SGD), "low": (256, 1, 1, _SGD), "mid": (512, 1, 1, _SGD),
                       "upper": (768, 1, 7, _SGD), "high": (1024, 1, 3, _SGD), "adam": (2048, 1, 11, _ADAM),
                       "top": (2048, 1, 2, _SGD)},
              "verify_images": 500, "accuracy_range": [0.0, 1.0]},
}
# the default zoo; --zoo picks others among SIZES' heads (``upper``, between mid and high, is not in it)
ZOO = ("low", "mid", "high", "adam", "top")
HEADS = tuple(k for k in SIZES["full"]["runs"] if k != "base")
# 16 single asks at the top of the served range and at each pin candidate: where noise leaves the
# best head 1 ask in 8, 3 asks (the attack's default) miss it in about a third of the runs
ATTACKER = {"probes": 8, "repeats": 3, "pin_repeats": 16}
ATTACKER_PER_IMAGE = {**ATTACKER, "probes": 1}  # noise drawn per image: one probe an ask, a pure answer
ATTACKERS = {"steady": {"pin": "steady"}, "center": {"pin": "center"}, "vote3": {"pin": "steady", "vote": 3},
             "filter": {"pin": "steady", "filter": "auto"}, "seq": {"pin": "steady", "filter": "seq"},
             "tag": {"pin": "steady", "tag": True}}
# a drop level may name a member (``drop:0.6,mid``: to mid's profiled accuracy)
NOISES = ("gaussian:0.02", "gaussian:0.03", "gaussian:0.05", "gaussian:0.08", "gaussian:0.12", "drop:0.9",
          "drop:0.3,mid", "drop:0.5,mid", "drop:0.6,mid", "drop:0.7,mid", "drop:0.75,mid", "drop:0.8,mid",
          "drop:0.85,mid", "drop:0.9,mid", "drop:0.95,high", "drop:0.8,mid/image", "drop:0.85,mid/image",
          "drop:0.875,mid/image", "drop:0.9,mid/image")
CURVE = (250, 500, 1000, 2000)  # the single model's extra budgets: what fewer answers of the victim are worth
USERS_STREAM = 7919  # goodput_load's targets: a random stream apart from the zoo's noise of the same seed
GOAL = {"fidelity_cut": 0.04, "goodput": 0.80}  # the target: a >= 4-point cut at >= 80% goodput


def parse_args(argv):
    from qdefend.serve.service import ServeConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, default=Path("runs/psml"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/psml"))
    p.add_argument("--budget", type=int, default=5000)
    p.add_argument("--noises", nargs="+", default=list(NOISES), help="defense rows: --target-noise specs")
    p.add_argument("--attackers", default=",".join(ATTACKERS), help=f"defense rows: some of {', '.join(ATTACKERS)}")
    p.add_argument("--load-requests", type=int, default=1500)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--size", choices=tuple(SIZES), default="full")
    p.add_argument("--zoo", default=",".join(ZOO),
                   help="comma-separated heads served, among: " + ", ".join(HEADS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-resolution-ms", type=float, default=ServeConfig.latency_resolution_ms,
                   help="the zoo's latency profiles are rounded up to this (qdefend serve's flag): on a busy "
                        "machine a coarser step keeps one head's slow profile from reordering the zoo")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds (zoo noise, attack, load): the defense rows per seed, to psml-seeds.*")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    a.attackers = [s for s in a.attackers.split(",") if s]
    a.zoo = [s for s in a.zoo.split(",") if s]
    if len(a.zoo) < 2 or len(set(a.zoo)) < len(a.zoo) or any(k not in HEADS for k in a.zoo) or "top" not in a.zoo:
        p.error(f"--zoo {','.join(a.zoo)}: name two or more different heads among {', '.join(HEADS)}, top included")
    bad = [s for s in a.attackers if s not in ATTACKERS]
    if bad:
        p.error(f"--attackers {','.join(bad)}: choose among {', '.join(ATTACKERS)}")
    if not a.latency_resolution_ms > 0:
        p.error(f"--latency-resolution-ms {a.latency_resolution_ms:g}: give a step > 0 in ms, e.g. 1")
    if a.seeds is not None:
        try:
            a.seeds = list(dict.fromkeys(int(v) for v in a.seeds.split(",") if v.strip()))
        except ValueError:
            a.seeds = []
        if not a.seeds or min(a.seeds) < 0:
            p.error("--seeds must be non-negative integers separated by commas: e.g. --seeds 0,1,2")
    from qdefend.errors import QdefendError
    from qdefend.serve.zoo import TargetNoise

    try:
        for spec in a.noises:
            TargetNoise.parse(resolve_noise(spec, {k: 0.5 for k in a.zoo}))
    except QdefendError as e:
        p.error(str(e))
    return a


def resolve_noise(spec: str, accuracy: dict[str, float]) -> str:
    """``drop:P,NAME[/image]`` -> ``drop:P,<NAME's accuracy>[/image]``; other specs unchanged."""
    body, slash, per = spec.partition("/")
    dist, _, values = body.partition(":")
    head, sep, level = values.partition(",")
    if dist != "drop" or not sep or level not in accuracy:
        return spec
    return f"drop:{head},{accuracy[level]:.6f}{slash}{per}"


# ------------------------------------------------------------------------------ the zoo


def build_zoo(runs_dir: Path, size: str, say, heads=ZOO) -> dict[str, Path]:
    """Train and export ``base`` and the ``heads`` (SIZES[size]) not yet done; their run folders."""
    from qdefend.stages import ensure_exported, ensure_trained

    s = SIZES[size]
    runs = {k: v for k, v in s["runs"].items() if k == "base" or k in heads}
    roots = {k: runs_dir / k for k in runs}
    for name, (images, epochs, seed, opt) in runs.items():
        cfg = {"data": {"limit_train": images}, "train": {"epochs": epochs, "seed": seed, **opt}}
        if name != "base":
            cfg["init_from"] = str(roots["base"])
            cfg["train"]["freeze"] = "encoder"
        ensure_trained(roots[name], cfg, say=lambda m, n=name: say(f"{n}: {m}"))
        ensure_exported(roots[name], verify_images=s["verify_images"], say=lambda m, n=name: say(f"{n}: {m}"))
    return roots


class Server:
    """A zoo behind uvicorn in a thread on 127.0.0.1 (port from the OS)."""

    def __init__(self, members: list[str], noise: str | None, args, seed: int = 0):
        """``args``: the benchmark's, for the server's ``threads`` and ``latency_resolution_ms``."""
        import uvicorn

        from qdefend.serve.app import create_app
        from qdefend.serve.service import ServeConfig

        cfg = ServeConfig(run=members[0].rsplit(":", 1)[0], zoo=members, insecure_no_auth=True, threads=args.threads,
                          target_noise=noise, zoo_seed=seed, latency_resolution_ms=args.latency_resolution_ms)
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
    # the users' own stream: the zoo's noise is seeded with the same number (``--zoo-seed``), and one
    # stream for both would draw request i's accuracy target and its noise from the same uniform
    # (a drop would then never hit the targets above its level, for P below their quantile)
    rng = np.random.default_rng([USERS_STREAM, seed])
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
           attacker: str = "steady", curve: bool = False, seed: int = 0) -> dict:
    """One attack on the served zoo (``seed``: its pool order, clone and release draws); ``curve``:
    also a clone per budget in CURVE (one query sequence)."""
    from qdefend.attacks import build_attack
    from qdefend.attacks.zoo import open_zoo_target
    from qdefend.serve.zoo import ZooEvaluator

    target = open_zoo_target(base, f"zoo:{server.url}", truth=ZooEvaluator(server.zoo), deadline_s=1800, seed=seed)
    budgets = sorted({b for b in CURVE if b < budget} | {budget}) if curve else [budget]
    per_image = getattr(server.zoo.policy.noise, "per", "request") == "image"
    atk = build_attack("fingerprint", mode=mode, budgets=budgets, accuracy_range=accuracy_range,
                       **(ATTACKER_PER_IMAGE if per_image else ATTACKER),
                       **(ATTACKERS[attacker] if mode == "fingerprint" else {}))
    t0 = time.perf_counter()
    res = atk.run(target, data, seed=seed, progress=lambda m: print(f"    {m}", file=sys.stderr, flush=True))
    fp = res.extra.get("fingerprint") or {}
    share = None
    if fp.get("pinned"):  # the operator's view: how often the policy gives the best head at the pinned targets
        from qdefend.serve.zoo import SelectionPolicy, Targets

        pol = SelectionPolicy(server.zoo.policy.profiles, server.zoo.policy.noise, seed=1)
        t = Targets(fp["pinned"]["accuracy"], fp["pinned"]["latency_ms"], True)
        share = float(np.mean([pol.select(t) == target.truth.most_accurate for _ in range(4000)]))
    return {"mode": mode, "attacker": attacker if mode == "fingerprint" else None,
            "clone_acc": res.metrics["clone_acc"], "fidelity": res.metrics["fidelity"],
            "victim_acc": res.metrics["victim_acc"], "queries": int(res.metrics["queries"]),
            "fingerprint_queries": int(res.metrics["fingerprint_queries"]),
            "identification_acc": res.metrics.get("identification_acc"),
            "victim_identified": res.metrics.get("victim_identified"), "vote": res.extra.get("vote"),
            "filter": res.extra.get("filter"), "tag": res.extra.get("tag"), "reference_member": fp.get("reference_member"),
            "pinned": fp.get("pinned"), "clusters": fp.get("clusters"), "pin_candidates": fp.get("pin_candidates"),
            "probes": atk.config.probes,
            "best_head_share_at_pin": share, "fidelity_to": res.extra.get("fidelity_to"),
            "curve": [{k: c[k] for k in ("queries", "clone_acc", "fidelity")} for c in res.extra["curve"]],
            "http_requests": target.requests, "wall_s": round(time.perf_counter() - t0, 1)}


def best_pin(server: Server, points: int = 20, draws: int = 2000) -> dict:
    """The operator's view: the accuracy target in the best head's band (at the loosest latency)
    where the noisy policy gives the best head most often, and how often."""
    from qdefend.serve.zoo import SelectionPolicy, Targets

    pol = server.zoo.policy
    best = max(range(len(pol.profiles)), key=lambda i: pol.profiles[i].accuracy)
    accs = sorted({p.accuracy for p in pol.profiles})
    lo = accs[-2] if len(accs) > 1 else 0.0
    sim = SelectionPolicy(pol.profiles, pol.noise, seed=1)
    share = {float(a): float(np.mean([sim.select(Targets(float(a), math.inf, True)) == best for _ in range(draws)]))
             for a in np.linspace(lo, accs[-1], points + 1)[1:]}
    a = max(share, key=share.get)
    return {"accuracy": a, "share": share[a]}


# ------------------------------------------------------------------------------ output


def defense_keys(rows: dict) -> list[str]:
    """``defense@SPEC`` rows, by noise family (in first-seen order), then scale."""
    keys = [k for k in rows if k.startswith("defense@")]
    families = list(dict.fromkeys(_noise(k)[0] for k in keys))
    return sorted(keys, key=lambda k: (families.index(_noise(k)[0]), _noise(k)[1]))


def _noise(key: str) -> tuple[str, float]:
    """``defense@drop:0.3,mid`` -> ("drop to mid", 0.3): the family (what the sweep keeps fixed)
    and the swept scale (the accuracy scale, or a drop's probability); ``/image``: ", per image"."""
    body, _, per = key.split("@", 1)[1].partition("/")
    dist, _, values = body.partition(":")
    scale, *rest = values.split(",")
    each = f", per {per}" if per else ""
    if dist == "drop":
        return (f"drop to {rest[0]}" if rest else "drop to the second best") + each, float(scale)
    return (f"{dist}, latency {rest[0]}" if rest and float(rest[0]) else dist) + each, float(scale)


def protection(rows: dict, key: str) -> dict | None:
    """The undefended fingerprint attack minus the best attacker on the defended zoo (fidelity and
    clone accuracy, fractions), with the attacker that was best. None before the reference row."""
    ref = rows.get("fingerprint")
    attacks = dict(rows[key]["attacks"])
    if not ref or not attacks:
        return None
    fid = max(attacks, key=lambda a: attacks[a]["fidelity"])
    acc = max(attacks, key=lambda a: attacks[a]["clone_acc"])
    return {"fidelity_cut": ref["fidelity"] - attacks[fid]["fidelity"], "fidelity_by": fid,
            "accuracy_cut": ref["clone_acc"] - attacks[acc]["clone_acc"], "accuracy_by": acc}


def goal_verdict(rows: dict) -> str:
    """One sentence: is there a noise with goodput >= GOAL and a worst-case fidelity cut >= GOAL
    (one seed: ``--seeds`` says whether it holds across seeds)?"""
    points = [(k, rows[k]["goodput"]["goodput"], protection(rows, k)) for k in defense_keys(rows)]
    points = [(k, g, p) for k, g, p in points if p is not None]
    attackers = sorted({a for k, *_ in points for a in rows[k]["attacks"]})
    want = (f"a fidelity cut >= {100 * GOAL['fidelity_cut']:g} points against the best of the measured attackers "
            f"({', '.join(attackers) or 'none'}) at goodput >= {100 * GOAL['goodput']:g}%, one seed")
    if not points:
        return f"goal ({want}): not measured (no defense rows)"
    ok = [(k, g, p) for k, g, p in points if g >= GOAL["goodput"] and p["fidelity_cut"] >= GOAL["fidelity_cut"]]
    fit = [(k, g, p) for k, g, p in points if g >= GOAL["goodput"]]
    if ok:
        k, g, p = max(ok, key=lambda t: t[2]["fidelity_cut"])
        return (f"goal ({want}): **met** by {len(ok)} noise setting(s); the largest cut: `{k.split('@')[1]}`, "
                f"{100 * p['fidelity_cut']:.2f} points at {100 * g:.1f}% goodput")
    if not fit:
        return f"goal ({want}): **not met**: no noise setting kept goodput >= {100 * GOAL['goodput']:g}%"
    k, g, p = max(fit, key=lambda t: t[2]["fidelity_cut"])
    return (f"goal ({want}): **not met**; the best point: `{k.split('@')[1]}`, {100 * p['fidelity_cut']:.2f} "
            f"points at {100 * g:.1f}% goodput")


def markdown(rows: dict, profiles: list[dict], attackers: list[str]) -> str:
    out = ["| zoo head | test accuracy (int8) | latency profile ms (measured) | top-1 agreement with the best |",
           "|---|---|---|---|"]
    out += [f"| `{p['name']}` | {100 * p['accuracy']:.2f}% | {p['latency_ms']:g} ({p['measured_ms']:.3f}) | "
            + (f"{100 * p['agreement_with_top']:.2f}% |" if "agreement_with_top" in p else "- |") for p in profiles]
    out += ["", "| attack | queries (fingerprint + extraction) | identification acc | clone acc | "
                "fidelity to the best |",
            "|---|---|---|---|---|"]
    label = {"single": "single exposed model (the best head alone; upper bound)",
             "naive": "naive (random targets, mixed answers)", "fingerprint": "fingerprint then extract",
             "fingerprint+vote3": "fingerprint then extract, 3 asks an image (majority)"}
    for key, text in label.items():
        r = rows.get(key)
        if r:
            ident = "-" if r["identification_acc"] is None else f"{100 * r['identification_acc']:.1f}%"
            out.append(f"| {text} | {r['fingerprint_queries']} + {r['queries']} | {ident} | "
                       f"{100 * r['clone_acc']:.2f}% | {100 * r['fidelity']:.2f}% |")
    head = " | ".join(f"{a}: fidelity / clone acc" for a in attackers)
    out += ["", f"| target noise | goodput (accuracy misses, latency misses) | {head} | protection: fidelity cut / "
                "accuracy cut (best measured attacker) | answers by the best head at the steady pin |",
            "|---|---|" + "---|" * len(attackers) + "---|---|"]
    ref, g0 = rows.get("fingerprint"), rows.get("goodput@0")

    def gp(g):
        n = max(g["requests"], 1)
        return f"{100 * g['goodput']:.1f}% ({100 * g['missed_accuracy'] / n:.1f}, {100 * g['missed_latency'] / n:.1f})"

    if ref and g0:
        cells = " | ".join(f"{100 * ref['fidelity']:.2f}% / {100 * ref['clone_acc']:.2f}%" if a == "steady"
                           else "-" for a in attackers)
        out.append(f"| none | {gp(g0)} | {cells} | 0 / 0 | 100% |")

    def cell(r):
        miss = "" if r.get("victim_identified") else " (victim missed)"
        kept = _kept(r)
        kept = "" if kept is None else f", {kept} kept"
        return f"{100 * r['fidelity']:.2f}% / {100 * r['clone_acc']:.2f}%{miss}{kept}"

    for key in defense_keys(rows):
        r, a = rows[key], rows[key]["attacks"]
        p = protection(rows, key)
        prot = "-" if p is None else (f"{100 * p['fidelity_cut']:+.2f} ({p['fidelity_by']}) / "
                                      f"{100 * p['accuracy_cut']:+.2f} ({p['accuracy_by']})")
        share = (a.get("steady") or {}).get("best_head_share_at_pin")
        out.append(f"| `{key.split('@', 1)[1]}` | {gp(r['goodput'])} | "
                   + " | ".join(cell(a[x]) if x in a else "-" for x in attackers)
                   + f" | {prot} | {'-' if share is None else f'{100 * share:.0f}%'} |")
    out += ["", goal_verdict(rows)]
    return "\n".join(out) + "\n"


def plot(rows: dict, path: Path) -> Path | None:
    ref, g0 = rows.get("fingerprint"), rows.get("goodput@0")
    keys = [k for k in defense_keys(rows) if protection(rows, k) is not None]
    if not ref or not g0 or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 5.4))
    dists = list(dict.fromkeys(_noise(k)[0] for k in keys))
    for color, dist in zip(("C0", "C3", "C2", "C1", "C4", "C5", "C6", "C8"), dists):
        ks = [k for k in keys if _noise(k)[0] == dist]
        gp = [100 * g0["goodput"]] + [100 * rows[k]["goodput"]["goodput"] for k in ks]
        prot = [protection(rows, k) for k in ks]
        fid = [0.0] + [100 * p["fidelity_cut"] for p in prot]
        acc = [0.0] + [100 * p["accuracy_cut"] for p in prot]
        ax.plot(gp, fid, "o-", color=color, label=f"{dist}: fidelity cut (best measured attacker)")
        ax.plot(gp, acc, "s--", color=color, alpha=0.6, label=f"{dist}: clone accuracy cut (best measured attacker)")
        for x, y, k in zip(gp[1:], fid[1:], ks):
            ax.annotate(f"{_noise(k)[1]:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=color)
    ax.axvline(100 * GOAL["goodput"], color="grey", lw=0.8, ls=":")
    ax.axhline(100 * GOAL["fidelity_cut"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("goodput of legitimate users under load (%)")
    ax.set_ylabel("protection: drop vs. no noise (points)")
    ax.set_title("PSML target noise: protection vs goodput (Fashion-MNIST zoo)")
    ax.invert_xaxis()
    ax.set_ylim(top=ax.get_ylim()[1] * 1.45)  # room for the legend above the curves
    ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_json(path: Path, res: dict) -> None:
    """Write ``res`` to ``path`` atomically (a temporary file, then a rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2, default=str) + "\n")
    tmp.replace(path)


def measure_row(key: str, members: list[str], noise: str | None, mode: str | None, attacker: str | None,
                profiles: list[dict], roots: dict, data, args, say, seed: int = 0, tag: str = "") -> dict:
    """One row, on a fresh server of ``members`` with target noise ``noise`` (resolved): goodput
    alone (``mode`` None), an attack on the undefended zoo (``noise`` None), or a defense row (the
    goodput, then every attacker of ``args.attackers``). ``seed``: the zoo's noise, the load and
    the attacks."""
    tag = tag or f"[{key}]"
    say(f"{tag} serving {len(members)} head(s), noise {noise or 'none'}")
    server = Server(members, noise, args, seed=seed)
    try:
        rng_acc = SIZES[args.size]["accuracy_range"]
        served = [{k: m[k] for k in ("name", "accuracy", "latency_ms", "measured_ms")}
                  for m in server.zoo.describe()["members"]]
        if [m["latency_ms"] for m in served] != [m["latency_ms"] for m in profiles]:
            say(f"{tag} WARNING: latency profiles {[m['latency_ms'] for m in served]} differ from the "
                "reference zoo's: this row's policy orders the heads differently (raise --latency-resolution-ms)")
        if mode is None or noise is not None:
            gp = goodput_load(server, roots["base"], args.load_requests, args.clients, seed=seed)
            say(f"{tag} goodput {gp['goodput']:.3f} ({gp})")
        if mode is None:
            return {**gp, "profiles": served}
        if noise is None:
            row = {**attack(server, roots["base"], data, mode, args.budget, rng_acc, attacker or "steady", seed=seed),
                   "profiles": served}
            say(f"{tag} {row}")
            return row
        row = {"goodput": gp, "profiles": served, "noise": server.zoo.describe()["noise"],
               "best_pin": best_pin(server), "attacks": {
                   a: attack(server, roots["base"], data, mode, args.budget, rng_acc, a, seed=seed)
                   for a in args.attackers}}
        say(f"{tag} fidelity " + ", ".join(f"{a} {x['fidelity']:.4f}" for a, x in row["attacks"].items()))
        return row
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from qdefend.config import RunConfig
    from qdefend.data import load_dataset
    from qdefend.machine import load_average, machine_info
    from qdefend.serve.service import ServeConfig

    torch.set_num_threads(args.threads)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    roots = build_zoo(args.runs_dir, args.size, say, args.zoo)
    members = [f"{roots[k]}:int8" for k in args.zoo]
    settings = {"size": args.size, "budget": args.budget, "attacker": ATTACKER,
                "attacker_per_image_noise": ATTACKER_PER_IMAGE, "load_requests": args.load_requests,
                "clients": args.clients, "threads": args.threads, "members": members, "attackers": args.attackers,
                "schema": 3}
    if args.latency_resolution_ms != ServeConfig.latency_resolution_ms:  # recorded when set: older rows resume
        settings["latency_resolution_ms"] = args.latency_resolution_ms
    args.out.mkdir(parents=True, exist_ok=True)
    if args.seeds is not None:
        return main_seeds(args, argv, roots, members, {**settings, "attacker_configs": {
            a: ATTACKERS[a] for a in args.attackers}, "schema": "seeds-1"}, say, t_start)
    path = args.out / "psml.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    rows = old.get("rows", {}) if old.get("settings") == settings and not args.force else {}
    data = load_dataset(RunConfig.load(roots["top"] / "config.toml").data)

    def save(profiles):
        res = {"benchmark": "qdefend.psml", "schema_version": 3,
               "command": " ".join(["python", "benchmarks/psml.py", *(argv if argv is not None else sys.argv[1:])]),
               "settings": settings, "goal": GOAL, "zoo": profiles, "rows": rows, "machine": machine_info(),
               "load_average": load_average(), "wall_s": round(time.perf_counter() - t_start, 1)}
        _write_json(path, res)

    profiles = old.get("zoo") if rows else None
    jobs = [("naive", members, None, "naive", None), ("fingerprint", members, None, "fingerprint", "steady"),
            ("fingerprint+vote3", members, None, "fingerprint", "vote3"), ("goodput@0", members, None, None, None)]
    jobs += [(f"defense@{spec}", members, spec, "fingerprint", None) for spec in args.noises]
    named = {k: m for k, m in zip(args.zoo, members)}
    for key, zoo_members, noise, mode, attacker in [("zoo", members, None, None, None)] + jobs:
        if key == "zoo":  # profiles, agreement and the best head, from the undefended zoo
            if profiles:
                continue
            server = Server(members, None, args)
            try:
                profiles = server.zoo.describe()["members"]
                for prof, agree in zip(profiles, agreement(server, roots["base"], data)):
                    prof["agreement_with_top"] = agree
            finally:
                server.stop()
            save(profiles)
            continue
        if key in rows:
            say(f"[{key}] kept from {path}")
            continue
        if noise:  # a drop level may name a member: its profiled accuracy
            noise = resolve_noise(noise, {k: next(p["accuracy"] for p in profiles if p["name"] == m)
                                          for k, m in named.items()})
        rows[key] = measure_row(key, zoo_members, noise, mode, attacker, profiles, roots, data, args, say)
        save(profiles)
    if "single" not in rows:  # the best head alone: the exposed single model
        best = max(profiles, key=lambda p: p["accuracy"])["name"]
        say(f"[single] serving {best} alone")
        server = Server([best], None, args)
        try:
            rows["single"] = attack(server, roots["base"], data, "naive", args.budget,
                                    SIZES[args.size]["accuracy_range"], curve=True)
        finally:
            server.stop()
        save(profiles)
    md = markdown(rows, profiles or [], args.attackers)
    (args.out / "psml.md").write_text(md)
    png = plot(rows, args.out / "psml.png")
    save(profiles)
    print(md)
    print(f"wrote {path}, {args.out / 'psml.md'}" + (f", {png}" if png else ""))
    return 0


# ------------------------------------------------------------------------------ across seeds


def _stats(v: list[float]) -> tuple[float, float]:
    """(mean, sample std; 0 for one value)."""
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def seed_summary(by_seed: dict[str, dict], seeds: list[int]) -> list[dict]:
    """Per noise setting (``None``: no noise) over the given seeds that have it and their own
    undefended ``fingerprint`` row: goodput, the protection against each seed's best attacker, and
    every attacker's fidelity, as per-seed lists (fractions; in ``seeds`` order)."""
    have = [(s, by_seed[str(s)]) for s in seeds if str(s) in by_seed]
    keys = defense_keys({k: None for _, rows in have for k in rows})
    out = []
    base = [(s, r) for s, r in have if "goodput@0" in r and "fingerprint" in r]
    if base:
        out.append({"noise": None, "seeds": [s for s, _ in base],
                    "goodput": [r["goodput@0"]["goodput"] for _, r in base],
                    "fidelity_cut": [0.0] * len(base), "accuracy_cut": [0.0] * len(base), "best_by": [None] * len(base),
                    "reference_fidelity": [r["fingerprint"]["fidelity"] for _, r in base], "attacks": {}})
    for key in keys:
        got = [(s, r) for s, r in have if key in r and protection(r, key) is not None]
        if not got:
            continue
        prot = [protection(r, key) for _, r in got]
        names = list(dict.fromkeys(a for _, r in got for a in r[key]["attacks"]))
        attacks = {}
        for a in names:
            runs = [r[key]["attacks"][a] for _, r in got if a in r[key]["attacks"]]
            attacks[a] = {"fidelity": [x["fidelity"] for x in runs], "clone_acc": [x["clone_acc"] for x in runs],
                          "victim_missed": sum(not x.get("victim_identified") for x in runs),
                          # per seed; None where neither a filter (R asks) nor a tag ran
                          "kept": [_kept(x) for x in runs],
                          "asks": [x["filter"]["asks"] if (x.get("filter") or {}).get("asks") else None for x in runs]}
        out.append({"noise": key.split("@", 1)[1], "key": key, "seeds": [s for s, _ in got],
                    "goodput": [r[key]["goodput"]["goodput"] for _, r in got],
                    "fidelity_cut": [p["fidelity_cut"] for p in prot], "accuracy_cut": [p["accuracy_cut"] for p in prot],
                    "best_by": [p["fidelity_by"] for p in prot],
                    "reference_fidelity": [r["fingerprint"]["fidelity"] for _, r in got], "attacks": attacks})
    return out


def _kept(run: dict) -> int | None:
    """The answers a filtering or tagging attacker kept of its queries (None for the others)."""
    if (run.get("filter") or {}).get("asks"):
        return run["filter"]["kept"]
    return (run.get("tag") or {}).get("kept")


def _meets(cut: float, good: float) -> bool:
    return cut >= GOAL["fidelity_cut"] and good >= GOAL["goodput"]


def seeds_verdict(summary: list[dict]) -> list[str]:
    """Two lines: the goal on the means over seeds (the rule), and in each seed on its own."""
    points = [p for p in summary if p["noise"]]
    attackers = sorted({a for p in points for a in p["attacks"]})
    want = (f"mean over seeds of the fidelity cut against each seed's best attacker ({', '.join(attackers) or 'none'}) "
            f">= {100 * GOAL['fidelity_cut']:g} points and mean goodput >= {100 * GOAL['goodput']:g}%")
    if not points:
        return [f"goal ({want}): not measured (no defense rows)"]

    def describe(p):
        (c, cs), (g, gs) = _stats(p["fidelity_cut"]), _stats(p["goodput"])
        worst = int(np.argmin(p["fidelity_cut"]))
        low = int(np.argmin(p["goodput"]))
        n_ok = sum(_meets(c_, g_) for c_, g_ in zip(p["fidelity_cut"], p["goodput"]))
        return (f"`{p['noise']}`, {100 * c:.2f} ± {100 * cs:.2f} points at {100 * g:.1f} ± {100 * gs:.1f}% goodput "
                f"over {len(p['seeds'])} seeds; worst seed: cut {100 * p['fidelity_cut'][worst]:.2f} (seed "
                f"{p['seeds'][worst]}), goodput {100 * p['goodput'][low]:.1f}% (seed {p['seeds'][low]}); "
                f"{n_ok} of {len(p['seeds'])} seeds meet both on their own")

    ok = [p for p in points if _meets(_stats(p["fidelity_cut"])[0], _stats(p["goodput"])[0])]
    fit = [p for p in points if _stats(p["goodput"])[0] >= GOAL["goodput"]]
    if ok:
        best = max(ok, key=lambda p: _stats(p["fidelity_cut"])[0])
        line = f"goal ({want}): **met** by {len(ok)} noise setting(s); the largest mean cut: {describe(best)}"
    elif fit:
        best = max(fit, key=lambda p: _stats(p["fidelity_cut"])[0])
        line = f"goal ({want}): **not met**; the best point: {describe(best)}"
    else:
        line = f"goal ({want}): **not met**: no noise setting kept mean goodput >= {100 * GOAL['goodput']:g}%"
    every = [p for p in points if all(_meets(c, g) for c, g in zip(p["fidelity_cut"], p["goodput"]))]
    line2 = ("in every seed on its own: " + (", ".join(f"`{p['noise']}`" for p in every) + " meet(s) the goal in "
                                              "all their seeds" if every else "no noise setting meets the goal in all "
                                              "its seeds"))
    return [line, line2]


def seeds_markdown(summary: list[dict], attackers: list[str]) -> str:
    """The multi-seed table (mean ± sample std over seeds) and the verdicts."""
    def ms(v, pct=True, digits=2):
        m, sd = _stats(v)
        k = 100 if pct else 1
        return f"{k * m:.{digits}f} ± {k * sd:.{digits}f}"

    head = " | ".join(f"{a}: fidelity %" for a in attackers)
    out = [f"| target noise | seeds | goodput % (min) | {head} | fidelity cut vs each seed's best attacker, points "
           "(min) | clone accuracy cut, points | best attacker by seed |",
           "|---|---|---|" + "---|" * len(attackers) + "---|---|---|"]
    for p in summary:
        seeds = ",".join(map(str, p["seeds"]))
        gp = f"{ms(p['goodput'], digits=1)} ({100 * min(p['goodput']):.1f})"
        if p["noise"] is None:
            cells = " | ".join(ms(p["reference_fidelity"]) if a == "steady" else "-" for a in attackers)
            out.append(f"| none | {seeds} | {gp} | {cells} | 0 | 0 | - |")
            continue
        cells = []
        for a in attackers:
            x = p["attacks"].get(a)
            if not x:
                cells.append("-")
                continue
            c = ms(x["fidelity"])
            if x["victim_missed"]:
                c += f" (victim missed in {x['victim_missed']})"
            if any(k is not None for k in x["kept"]):
                asks = "" if all(v is None for v in x["asks"]) else \
                    f"R = {'/'.join('-' if v is None else str(v) for v in x['asks'])}, "
                c += f"; {asks}kept {'/'.join('-' if v is None else str(v) for v in x['kept'])}"
            cells.append(c)
        worst = int(np.argmin(p["fidelity_cut"]))
        cut = f"{ms(p['fidelity_cut'])} ({100 * p['fidelity_cut'][worst]:.2f}, seed {p['seeds'][worst]})"
        out.append(f"| `{p['noise']}` | {seeds} | {gp} | " + " | ".join(cells)
                   + f" | {cut} | {ms(p['accuracy_cut'])} | {', '.join(p['best_by'])} |")
    return "\n".join(out + [""] + [v for line in seeds_verdict(summary) for v in (line, "")]).rstrip() + "\n"


def seeds_plot(summary: list[dict], path: Path) -> Path | None:
    """Mean protection against mean goodput (error bars: sample std over seeds), per noise family."""
    points = [p for p in summary if p["noise"]]
    none = next((p for p in summary if p["noise"] is None), None)
    if not points or none is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 5.4))
    fam = lambda p: _noise(p["key"])  # noqa: E731
    dists = list(dict.fromkeys(fam(p)[0] for p in points))
    g0 = _stats(none["goodput"])
    for color, dist in zip(("C0", "C3", "C2", "C1", "C4", "C5", "C6", "C8"), dists):
        ps = sorted((p for p in points if fam(p)[0] == dist), key=lambda p: fam(p)[1])
        gm = [g0] + [_stats(p["goodput"]) for p in ps]
        cm = [(0.0, 0.0)] + [_stats(p["fidelity_cut"]) for p in ps]
        ax.errorbar([100 * g for g, _ in gm], [100 * c for c, _ in cm], xerr=[100 * s for _, s in gm],
                    yerr=[100 * s for _, s in cm], fmt="o-", color=color, capsize=3,
                    label=f"{dist}: fidelity cut vs the best attacker (mean ± std)")
        for p in ps:
            ax.scatter([100 * g for g in p["goodput"]], [100 * c for c in p["fidelity_cut"]], s=10, color=color,
                       alpha=0.35)
            ax.annotate(f"{fam(p)[1]:g}", (100 * _stats(p["goodput"])[0], 100 * _stats(p["fidelity_cut"])[0]),
                        textcoords="offset points", xytext=(5, 5), fontsize=7, color=color)
    ax.axvline(100 * GOAL["goodput"], color="grey", lw=0.8, ls=":")
    ax.axhline(100 * GOAL["fidelity_cut"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("goodput of legitimate users under load (%)")
    ax.set_ylabel("protection: fidelity cut vs. no noise (points)")
    seeds = sorted({s for p in summary for s in p["seeds"]})
    ax.set_title(f"PSML target noise over seeds {','.join(map(str, seeds))} (dots: single seeds)")
    ax.invert_xaxis()
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main_seeds(args, argv, roots: dict, members: list[str], settings: dict, say, t_start: float) -> int:
    """``--seeds``: per seed, goodput@0, the undefended reference and the defense rows with every
    attacker; summary across seeds. Writes psml-seeds.json/.md/.png under --out."""
    from qdefend.config import RunConfig
    from qdefend.data import load_dataset
    from qdefend.machine import load_average, machine_info

    path = args.out / "psml-seeds.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    by_seed = old.get("rows", {}) if old.get("settings") == settings and not args.force else {}
    profiles = old.get("zoo") if by_seed else None
    data = load_dataset(RunConfig.load(roots["top"] / "config.toml").data)

    def save():
        res = {"benchmark": "qdefend.psml.seeds", "schema_version": 1,
               "command": " ".join(["python", "benchmarks/psml.py", *(argv if argv is not None else sys.argv[1:])]),
               "settings": settings, "seeds": args.seeds, "noises": args.noises, "goal": GOAL, "zoo": profiles,
               "rows": by_seed, "summary": seed_summary(by_seed, args.seeds), "machine": machine_info(),
               "load_average": load_average(), "wall_s": round(time.perf_counter() - t_start, 1)}
        _write_json(path, res)

    if not profiles:
        server = Server(members, None, args)
        try:
            profiles = server.zoo.describe()["members"]
        finally:
            server.stop()
    named = {k: m for k, m in zip(args.zoo, members)}
    accuracy = {k: next(p["accuracy"] for p in profiles if p["name"] == m) for k, m in named.items()}
    for seed in args.seeds:  # seed-major: an interrupted sweep leaves whole seeds
        rows = by_seed.setdefault(str(seed), {})
        jobs = [("goodput@0", None), ("fingerprint", None)] + [(f"defense@{spec}", spec) for spec in args.noises]
        for key, spec in jobs:
            if key in rows:
                say(f"[seed {seed}] [{key}] kept from {path}")
                continue
            noise = resolve_noise(spec, accuracy) if spec else None
            mode = None if key == "goodput@0" else "fingerprint"
            rows[key] = measure_row(key, members, noise, mode, "steady", profiles, roots, data, args, say, seed=seed,
                                    tag=f"[seed {seed}] [{key}]")
            save()
    summary = seed_summary(by_seed, args.seeds)
    md = seeds_markdown(summary, args.attackers)
    (args.out / "psml-seeds.md").write_text(md)
    png = seeds_plot(summary, args.out / "psml-seeds.png")
    save()
    print(md)
    print(f"wrote {path}, {args.out / 'psml-seeds.md'}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
