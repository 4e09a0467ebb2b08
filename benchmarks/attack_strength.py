"""How strong is the default inversion attacker, and how far from the strongest one measured?

For each run's encoder artifact (e.g. the demo's undefended ``encoder.int8.tflite`` and a noise
sigma 0.1 run), the decoder attack is trained across four axes and scored on the same private
test images (the last 1,000 of the test set):

  (a) epochs 10 / 20 / 50 / 100 (the default decoder on the default attacker data);
  (b) attacker images 1k / 2.5k / 5k / 10k / 20k (``train_time``; past the 5,000-image aux split
      the attacker also holds victim training images, ``overlap``), plus the default ``infer_time``
      9,000;
  (c) the plain decoder (He et al.) vs the residual one (CEM's ``res_normN8C64``), the CEM code's
      own batch 256 / lr 1e-3 (``cem-batch256``) vs the default batch 64 / lr 2e-3, the ``fast``
      CPU preset the demo runs, and the attacker's images augmented (``augment-*``: mirrored and/or
      shifted copies queried too, :func:`qdefend.attacks.attacker.augmented_views`);
  (d) the decoder vs decoder + GAN refinement (``gan``, CEM's train_gan.py schedule).

Features are computed once per target through the artifact (``qdefend.edge.runtime``) and kept
in ``CACHE/NAME.npz`` (the encoder's outputs for every image the grid uses, the manifest's release
steps and wire grid), so the grid can run on another machine, a GPU one say, with only torch and
numpy: :class:`CachedTarget` applies the release and the wire exactly as the runtime does (the same
numpy functions, the same seeds), so its features are the artifact's, bit for bit. Images outside
the cache (augmented views) are answered by the run's artifact itself (the same sha256), so
those cells need the run on the machine.

    python benchmarks/attack_strength.py cache --run runs/demo --name undefended
    # the artifact the undefended-0ece820e rows attacked is kept here (its config, manifest and
    # encoder.int8.tflite, 110 KB), so later cells run against the same one on any machine:
    python benchmarks/attack_strength.py cache --name undefended-0ece820e \
        --run benchmarks/results/attack_strength/artifact-0ece820e
    python benchmarks/attack_strength.py cache --run runs/noise --name noise-0.1
    python benchmarks/attack_strength.py grid --device cuda --jobs 6     # or --device cpu (hours)
    python benchmarks/attack_strength.py grid --cells default,fast-preset --targets undefended   # a part
    python benchmarks/attack_strength.py speed --threads 2               # decoder step: NCHW vs channels_last
    python benchmarks/attack_strength.py plot

Writes ``benchmarks/results/attack_strength/attack_strength.json`` (a row per cell: metrics, the
held-out curve, converged, seconds, device and CPU/GPU), ``attack_strength.md`` and
``attack_strength.png`` (MSE along each axis) and ``gan_grid.png`` (originals, decoder, GAN).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from qdefend.attacks.targets import Target
from qdefend.data import Normalization, Split, SplitData
from qdefend.edge.release import to_wire, wire_dequantize

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "attack_strength"
ROWS = OUT / "rows"
N_TRAIN_IMAGES = 15000  # victim training images the cache holds (20k attacker images = 5k aux + 15k train)

# name -> (attack, preset, params): every cell of the grid
def cells() -> dict[str, tuple[str, str | None, dict[str, Any]]]:
    c: dict[str, tuple[str, str | None, dict[str, Any]]] = {"default": ("decoder", None, {})}
    # the default without the mirrored views (qdefend.attacks.attacker.augmented_views): the default
    # before they were added, and the decoder the epoch and data axes below were measured with
    none = {"augment": "none"}
    c["no-augment"] = ("decoder", None, none)
    c["cem-batch256"] = ("decoder", "cem", {})  # the CEM code's batch 256 / lr 1e-3
    for e in (10, 20, 100):
        c[f"epochs-{e}"] = ("decoder", None, {"epochs": e, **none})
    c["epochs-100-flip"] = ("decoder", None, {"epochs": 100})  # the default at twice its epochs
    for n in (1000, 2500, 5000, 10000, 20000):
        c[f"train_time-{n}"] = ("decoder", None, {"protocol": "train_time", "aux_size": n, "overlap": n > 5000, **none})
    for n in (10000, 20000):  # the default's data doubled, within one protocol
        c[f"train_time-{n}-flip"] = ("decoder", None, {"protocol": "train_time", "aux_size": n, "overlap": True})
    c["augment-flip+shift-4"] = ("decoder", None, {"augment": "flip+shift", "views": 4})
    # fewer epochs at another lr / batch: a cheaper schedule only counts if it reaches the default's MSE
    c["epochs-25-batch128"] = ("decoder", None, {"epochs": 25, "batch_size": 128, "lr": 1.4e-3, **none})
    c["plain-50"] = ("decoder", None, {"arch": "plain", "blocks": 0, "width": 32, **none})
    c["plain-preset"] = ("decoder", "plain", {})
    c["fast-preset"] = ("decoder", "fast", {})
    c["fast-preset-flip+shift-4"] = ("decoder", "fast", {"augment": "flip+shift", "views": 4})
    c["gan"] = ("gan", None, {})
    c["gan-fast"] = ("gan", "fast", {})  # the fast decoder refined for 20 epochs: the CPU check of (d)
    # the fast preset's former generator schedule (cosine period 40 epochs: lr still 5e-4 / 2 at the
    # end), and the same at lr 1e-4
    c["gan-fast-t40"] = ("gan", "fast", {"t_max": 40})
    c["gan-fast-lr1e-4"] = ("gan", "fast", {"lr_g": 1e-4, "t_max": 40})
    return c


# panel -> series (label suffix -> [(cell, x)]): the decoder without and with the mirror images
AXES = {
    "epochs": {"": [("epochs-10", 10), ("epochs-20", 20), ("no-augment", 50), ("epochs-100", 100)],
               ", mirror images": [("default", 50), ("epochs-100-flip", 100)]},
    "attacker images (train_time)": {
        "": [(f"train_time-{n}", n) for n in (1000, 2500, 5000, 10000, 20000)],
        ", mirror images": [(f"train_time-{n}-flip", n) for n in (10000, 20000)]},
}


# ---------------------------------------------------------------------------------------- cache


def _key(img: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=16).digest()


def build_cache(run_dir: str, artifact: str, name: str, cache_dir: Path) -> Path:
    """Encoder outputs of the aux split, the first N_TRAIN_IMAGES training images and the test set."""
    from qdefend.attacks.targets import open_target
    from qdefend.config import RunConfig
    from qdefend.data import load_dataset
    from qdefend.run import RunPaths

    cfg = RunConfig.load(RunPaths(run_dir).config)
    data = load_dataset(cfg.data)
    target = open_target(run_dir, artifact)
    parts = {"aux": data.aux, "train": data.train, "test": data.test}
    arrays: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for k, split in parts.items():
        n = N_TRAIN_IMAGES if k == "train" else len(split)
        arrays[f"{k}_images"] = split.images[:n]
        arrays[f"{k}_labels"] = split.labels[:n]
        arrays[f"{k}_z"] = target.encoder_output(split.images[:n])
    meta = {"run": str(run_dir), "artifact": artifact, "sha256": target.runtime.entry["sha256"],  # checked at open
            "name": name, "release": target.release, "wire": target.wire,
            "feature_shape": list(target.feature_shape), "input_shape": list(target.input_shape),
            "num_classes": data.num_classes, "class_names": list(data.class_names), "dataset": data.name,
            "normalization": data.normalization.to_dict(), "notes": target.notes,
            "query_s": round(time.perf_counter() - t0, 2)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}.npz"
    np.savez_compressed(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    return path


class CachedTarget(Target):
    """A features-only target served from a cache: release and wire as the runtime applies them."""

    def features(self, images01, *, release=True, seed=None):
        z = self.encoder_output(images01)
        rng = np.random.default_rng(seed)
        return wire_dequantize(to_wire(z, self.release["steps"], self.wire, rng, release=release), self.wire)

    def encoder_output(self, images01):
        x = np.asarray(images01)
        u8 = np.rint(x * 255).astype(np.uint8) if x.dtype != np.uint8 else x
        rows = [self._index.get(_key(im)) for im in u8]
        if not rows:
            return np.zeros((0, *self.feature_shape), np.float32)
        if all(r is not None for r in rows):
            return self._z[rows]
        # images outside the cache (an attacker's augmented views): the run's artifact answers them
        miss = np.array([r is None for r in rows])
        out = np.empty((len(rows), *self.feature_shape), np.float32)
        out[~miss] = self._z[[r for r in rows if r is not None]]
        out[miss] = self._live().encoder_output(x[miss])
        return out

    def _live(self) -> Target:
        if getattr(self, "_live_target", None) is None:
            from qdefend.attacks.targets import open_target

            try:
                t = open_target(self.meta["run"], self.meta["artifact"])
            except Exception as e:  # the run is not on this machine
                raise ValueError(f"an image outside the cache was asked for and the cache's run "
                                 f"{self.meta['run']} cannot answer it ({e}): run the grid where the run is") from None
            if t.runtime.entry["sha256"] != self.meta.get("sha256"):
                raise ValueError(f"{self.meta['run']}/{self.meta['artifact']} is not the artifact the cache was made "
                                 "from (sha256 differs): rebuild the cache with `cache`")
            self._live_target = t
        return self._live_target

    @classmethod
    def load(cls, path: Path) -> "CachedTarget":
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(arrays.pop("meta").tobytes())
        t = cls(name=meta["artifact"], kind="litert" if meta["artifact"].endswith(".tflite") else "onnxruntime",
                offers={"features"}, input_shape=meta["input_shape"],
                normalization=Normalization.from_dict(meta["normalization"]), release=meta["release"],
                feature_shape=meta["feature_shape"], num_classes=meta["num_classes"],
                notes=list(meta["notes"]) + ["features from the attack_strength cache"])
        t.wire = meta["wire"]
        t._z = np.concatenate([arrays[f"{k}_z"] for k in ("aux", "train", "test")]).astype(np.float32)
        imgs = np.concatenate([arrays[f"{k}_images"] for k in ("aux", "train", "test")])
        t._index = {_key(im): i for i, im in enumerate(imgs)}
        t.meta, t.arrays = meta, arrays
        return t


def cached_data(t) -> Any:
    """The SplitData the cache holds (train = its first N_TRAIN_IMAGES images; val empty)."""
    a, m = t.arrays, t.meta
    sp = {k: Split(a[f"{k}_images"], a[f"{k}_labels"]) for k in ("aux", "train", "test")}
    empty = Split(a["aux_images"][:0], a["aux_labels"][:0])
    return SplitData(name=m["dataset"], num_classes=m["num_classes"], class_names=m["class_names"],
                     shape=tuple(m["input_shape"]), normalization=Normalization.from_dict(m["normalization"]),
                     train=sp["train"], val=empty, test=sp["test"], aux=sp["aux"])


# ---------------------------------------------------------------------------------------- grid


def machine() -> dict[str, Any]:
    from qdefend.machine import machine_info

    info = machine_info(gpu=True)
    info["cpus"] = info["logical_cpus"]  # the rows' older key
    info["cpu_features"] = [f for f, on in info["flags"].items() if on]
    return info


def run_cell(job: tuple[str, str, str, dict]) -> dict[str, Any]:
    cache_path, cell, device, extra = job
    import torch

    from qdefend.attacks import build_attack

    torch.set_num_threads(int(os.environ.get("QDEFEND_CELL_THREADS", "2")))
    torch.backends.cudnn.benchmark = True
    t = CachedTarget.load(Path(cache_path))
    data = cached_data(t)
    attack, preset, params = cells()[cell]
    params = {**params, **extra}
    if device:
        params["device"] = device
    atk = build_attack(attack, preset=preset, **params)
    t0 = time.perf_counter()
    tag = f"[{t.meta['name']} {cell}]"
    res = atk.run(t, data, seed=0, progress=lambda m: print(f"{tag} {m}", flush=True))
    row = {"target": t.meta["name"], "artifact": t.meta["artifact"], "artifact_sha256": t.meta.get("sha256"),
           "cell": cell, "attack": attack, "preset": preset or "default", "config": res.config, "metrics": res.metrics,
           "training": res.extra.get("training"), "attacker": res.extra.get("attacker"),
           "seconds": round(time.perf_counter() - t0, 1)}
    if attack == "gan":
        row["decoder_training"] = res.extra.get("decoder_training")
    row["machine"] = machine()
    ROWS.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ROWS / f"{t.meta['name']}--{cell}.npz", originals=res.originals[:16],
                        reconstructions=res.reconstructions[:16])
    from qdefend.plainjson import plain

    (ROWS / f"{t.meta['name']}--{cell}.json").write_text(json.dumps(plain(row), indent=1) + "\n")
    print(f"{tag} mse {res.metrics['mse']:.5f} ssim {res.metrics['ssim']:.4f} "
          f"converged {bool(res.metrics.get('converged'))} in {row['seconds']:.0f} s", flush=True)
    return row


def grid(args) -> None:
    """Run the cells not yet done, in the order given; one row file per (target, cell), so several
    grid processes (one per target, say) can share the results folder."""
    cache_dir = Path(args.cache)
    caches = sorted(cache_dir.glob("*.npz"))
    if args.targets:
        caches = [c for c in caches if c.stem in args.targets.split(",")]
    if not caches:
        sys.exit(f"error: no caches in {cache_dir}: run `python benchmarks/attack_strength.py cache --run RUN` first")
    names = args.cells.split(",") if args.cells else list(cells())
    unknown = [n for n in names if n not in cells()]
    if unknown:
        sys.exit(f"error: unknown cell {unknown[0]}; valid: {', '.join(cells())}")
    extra = json.loads(args.set) if args.set else {}
    ROWS.mkdir(parents=True, exist_ok=True)
    jobs = [(str(c), n, args.device, extra) for n in names for c in caches
            if args.force or not (ROWS / f"{c.stem}--{n}.json").is_file()]
    print(f"attack_strength: {len(jobs)} cell(s) on {args.device or 'auto'} with {args.jobs} worker(s)", flush=True)
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            for f in as_completed([pool.submit(run_cell, j) for j in jobs]):
                f.result()
    else:
        for j in jobs:
            run_cell(j)


def load_rows() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(ROWS.glob("*.json"))]


def collect() -> Path:
    """attack_strength.json: every row, with the machine that ran it."""
    from qdefend.plainjson import plain

    path = OUT / "attack_strength.json"
    path.write_text(json.dumps(plain({"version": 1, "rows": load_rows()}), indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------- report


def _row(rows, target, cell):
    return next((r for r in rows if r["target"] == target and r["cell"] == cell), None)


def table(rows: list[dict]) -> str:
    out = ["| target | artifact | cell | attacker images | epochs run | MSE | SSIM | converged | vs best MSE | GAN: its "
           "decoder's MSE, sharpness GAN / decoder | s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for target in sorted({r["target"] for r in rows}):
        mine = [r for r in rows if r["target"] == target]
        best = min(r["metrics"]["mse"] for r in mine)
        for r in sorted(mine, key=lambda r: list(cells()).index(r["cell"]) if r["cell"] in cells() else 99):
            m, tr = r["metrics"], r.get("training") or {}
            gan = (f"{m['decoder_mse']:.5f}, {m['sharpness']:.3f} / {m['decoder_sharpness']:.3f}"
                   if "decoder_mse" in m else "-")
            out.append(f"| {target} | {(r.get('artifact_sha256') or '-')[:8]} | {r['cell']} | "
                       f"{(r.get('attacker') or {}).get('attacker_images', '-')} | "
                       f"{tr.get('epochs_run', '-')} | {m['mse']:.5f} | {m['ssim']:.4f} | "
                       f"{'yes' if m.get('converged') else 'no'} | {m['mse'] / best:.3f}x | {gan} | {r['seconds']:.0f} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows})
    order = ["plain-preset", "plain-50", "cem-batch256", "fast-preset", "fast-preset-flip+shift-4", "gan-fast-t40",
             "gan-fast-lr1e-4", "gan-fast", "no-augment", "default", "augment-flip+shift-4", "gan"]
    labels = [c for c in order if any(_row(rows, target, c) for target in targets)]  # bar groups, any target
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for t, target in enumerate(targets):
        color = f"C{t}"  # one colour per target in every panel
        for ax, (axis, series) in zip(axes[:2], AXES.items()):
            for suffix, pts in series.items():
                xs = [(v, _row(rows, target, c)) for c, v in pts if _row(rows, target, c)]
                if xs:
                    ax.plot([v for v, _ in xs], [r["metrics"]["mse"] for _, r in xs], "o-" if not suffix else "s--",
                            color=color, label=target + suffix)
            ax.set_xscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel("decoder MSE (lower = stronger)")
        have = [(i, _row(rows, target, c)) for i, c in enumerate(labels) if _row(rows, target, c)]
        width = 0.8 / len(targets)
        shift = (t - (len(targets) - 1) / 2) * width
        axes[2].bar([i + shift for i, _ in have], [r["metrics"]["mse"] for _, r in have], width=width, label=target,
                    color=color)
    axes[2].set_xticks(np.arange(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    axes[2].set_ylabel("MSE")
    axes[0].set_title("(a) epochs")
    axes[1].set_title("(b) attacker images")
    axes[2].set_title("(c, d) decoder and GAN")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "attack_strength.png", dpi=120)
    plt.close(fig)
    # originals / decoder / GAN reconstructions
    panels = []
    for target in targets:
        for cell in ("fast-preset", "gan-fast-t40", "gan-fast", "no-augment", "default", "gan"):
            p, row = ROWS / f"{target}--{cell}.npz", _row(rows, target, cell)
            if p.is_file():
                sha = (row or {}).get("artifact_sha256")
                with np.load(p) as f:
                    if not panels or panels[-1][0] != target:
                        panels.append((target, "private", f["originals"]))
                    panels.append((target, cell + (f" (artifact {sha[:8]})" if sha else ""), f["reconstructions"]))
    if panels:
        n = 10
        fig, axs = plt.subplots(len(panels), n, figsize=(n * 0.9, len(panels) * 1.0))
        for i, (target, what, ims) in enumerate(panels):
            for j in range(n):
                axs[i, j].imshow(ims[j, 0] if ims.shape[1] == 1 else ims[j].transpose(1, 2, 0),
                                 cmap="gray", vmin=0, vmax=1)
                axs[i, j].axis("off")
            axs[i, 0].set_title(f"{target}: {what}", fontsize=7, loc="left")
        fig.tight_layout()
        fig.savefig(OUT / "gan_grid.png", dpi=120)
        plt.close(fig)


def speed(args) -> dict[str, Any]:
    """Training-step time of the default decoder (batch 256) in contiguous NCHW vs channels_last
    memory layout: warm-up steps, then the median of the timed ones; ratio in the same run."""
    import torch
    from torch.nn import functional as F

    from qdefend.attacks.inversion.decoder import DecoderConfig, build_decoder

    torch.set_num_threads(args.threads)
    cfg = DecoderConfig()
    out: dict[str, Any] = {"machine": machine(), "threads": args.threads, "batch": cfg.batch_size,
                           "warmup": args.warmup, "repeats": args.repeats, "layouts": {}}
    for layout in ("contiguous", "channels_last"):
        net = build_decoder(cfg, (8, 7, 7), (1, 28, 28))
        z, x = torch.rand(cfg.batch_size, 8, 7, 7), torch.rand(cfg.batch_size, 1, 28, 28)
        if layout == "channels_last":
            net, z = net.to(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        times = []
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            loss = F.mse_loss(net(z), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        out["layouts"][layout] = {"median_ms": round(1e3 * float(np.median(times)), 1),
                                  "min_ms": round(1e3 * min(times), 1), "max_ms": round(1e3 * max(times), 1)}
    c, cl = (out["layouts"][k]["median_ms"] for k in ("contiguous", "channels_last"))
    out["channels_last_speedup"] = round(c / cl, 2)
    out["epoch_s_8100_images"] = round(cl / 1e3 * math.ceil(8100 / cfg.batch_size), 1)  # infer_time: 9,000 less 10% held out
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"speed-{args.threads}t.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache", help="query a run's artifact once and keep the encoder outputs")
    c.add_argument("--run", required=True)
    c.add_argument("--artifact", default="encoder.int8.tflite")
    c.add_argument("--name", required=True)
    c.add_argument("--cache", default=str(OUT / "cache"))
    g = sub.add_parser("grid", help="train every cell of the grid on every cached target")
    g.add_argument("--cache", default=str(OUT / "cache"))
    g.add_argument("--device", default=None, help="cpu | cuda (default: the attacks' auto)")
    g.add_argument("--jobs", type=int, default=1)
    g.add_argument("--cells", default=None, help="comma-separated cells (default all): " + ", ".join(cells()))
    g.add_argument("--set", default=None, help='JSON overrides for every cell, e.g. \'{"n_eval": 64}\'')
    g.add_argument("--targets", default=None, help="comma-separated cache names (default all)")
    g.add_argument("--force", action="store_true")
    sp = sub.add_parser("speed", help="decoder training-step time: contiguous vs channels_last")
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--warmup", type=int, default=3)
    sp.add_argument("--repeats", type=int, default=10)
    sub.add_parser("plot", help="table + figures from the grid's results")
    args = ap.parse_args(argv)
    if args.cmd == "cache":
        print(build_cache(args.run, args.artifact, args.name, Path(args.cache)))
        return
    if args.cmd == "speed":
        speed(args)
        return
    if args.cmd == "grid":
        grid(args)
    collect()
    rows = load_rows()
    if not rows:
        sys.exit(f"error: no results in {ROWS}: run `python benchmarks/attack_strength.py grid` first")
    (OUT / "attack_strength.md").write_text(table(rows))
    plot(rows)
    print(table(rows))


if __name__ == "__main__":
    main()
