"""The wire's bit-width as a lever: accuracy, inversion, extraction and bytes at 8/6/4/2 bits.

    python benchmarks/wire_bits.py [--size quick|full] [--bits 8,4,2] [--defenses none,noise]
                                   [--attacks decoder,knockoff] [--preset decoder=plain]
                                   [--base RUN] [--threads N] [--out DIR] [--runs-dir DIR]

Protocol. One base run (QAT int8, the default 8-bit wire, no defense; trained here unless --base
names one) is fine-tuned for ``finetune_epochs`` with each wire width (``quant.wire_bits``: the
coarser fake-quant at the cut, per tensor, release_then_wire) and each defense (``none``, and
``noise``: Gaussian release noise sigma 0.1, the defense that composes with any wire), so every
row starts from the same network and gets the same extra training: the 8-bit row is the control.
Each fine-tuned run is exported (LiteRT int8, verified on the whole test split with the release and
the wire a device applies) and attacked through the exported artifact, whose features go through
the bit-packed wire message and back (qdefend.attacks.targets): the black-box inverse network
(``decoder``; He et al., ACSAC 2019), optionally its GAN refinement (``gan``), and KnockoffNets
(``knockoff``; Orekondy et al., CVPR 2019) against the service (encoder artifact + cloud head).

Bytes: the HTTP body a device sends (qdefend.edge.wire): payload bytes per image (the packed
codes), and the whole body at batch 1 and at batch 64 (68-byte header per request for a
per-tensor grid), counted from the real encoded test images.

Output under --out: ``wire_bits.json`` (rows, machine, settings), ``wire_bits.md`` (the README
table) and ``wire_bits.png`` (accuracy and decoder MSE against bytes per image, matplotlib).
``--size quick`` is a CI smoke test (512 training images, attack preset "quick", bits 8 and 4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

HERE = Path(__file__).resolve().parent
ARTIFACT = "encoder.int8.tflite"
ATTACKS = ("decoder", "gan", "knockoff")
BITS = (8, 6, 4, 2)

DEFENSES: dict[str, dict[str, Any]] = {
    "none": {"stack": "none", "params": {}},
    "noise": {"stack": "noise", "params": {"noise": {"sigma": 0.1}}},
}

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"data": {"limit_train": 512, "limit_test": 300, "val_size": 200, "aux_size": 1000},
              "base_train": {"epochs": 1, "batch_size": 32}, "finetune": {"epochs": 1, "batch_size": 32, "lr": 0.01},
              "preset": "quick", "verify_images": 100, "bits": [8, 4], "defenses": ["none"],
              "attacks": ["decoder"], "params": {}},
    "full": {"data": {}, "base_train": {"epochs": 2}, "finetune": {"epochs": 1, "lr": 0.01},
             "preset": None, "verify_images": None, "bits": [8, 6, 4, 2], "defenses": ["none", "noise"],
             "attacks": ["decoder", "knockoff"], "params": {"knockoff": {"budgets": [5000]}}},
}


def run_config(size: str, defense: str | None, bits: int | None, base: Path | None) -> dict[str, Any]:
    """The RunConfig dict: the base run (defense None) or a fine-tune of `base` at `bits`."""
    s = SIZES[size]
    cfg: dict[str, Any] = {"data": {"name": "fashion-mnist", **s["data"]}, "quant": {"scheme": "int8"}}
    if defense is None:
        return {**cfg, "train": dict(s["base_train"])}
    return {**cfg, "quant": {"scheme": "int8", "wire_bits": bits}, "train": dict(s["finetune"]),
            "defense": json.loads(json.dumps(DEFENSES[defense])), "init_from": str(base)}


def wire_bytes(root: Path, artifact: str, images, seed: int = 0) -> dict[str, Any]:
    """Payload bytes per image and whole HTTP bodies at batch 1 and 64, from 64 real encoded images."""
    import numpy as np

    from qdefend.edge import wire as W
    from qdefend.edge.runtime import Runtime

    f = Runtime.open(root, artifact, threads=1).encode(images, seed=seed)
    body = lambda n: len(W.pack(f.q[:n], f.scale, f.zero_point, "0" * 64, bits=f.bits))  # noqa: E731
    per = W.payload_size(int(np.prod(f.q.shape[1:])), f.bits)
    return {"bits": f.bits, "payload_bytes_per_image": per, "body_bytes_batch1": body(1),
            "body_bytes_per_image_batch64": round(body(64) / 64, 2)}


def build_row(defense: str, bits: int, records: list[dict], manifest: dict, attacks: dict[str, dict],
              nbytes: dict) -> dict[str, Any]:
    from qdefend.run import train_summary

    ver = manifest.get("verification", {}).get("artifacts", {}).get(ARTIFACT, {})
    row: dict[str, Any] = {"defense": defense, "bits": bits, **train_summary(records),
                           "test_acc": ver.get("test_acc_release", ver.get("test_acc")), **nbytes,
                           "wire": manifest["features"]["wire"], "roundtrip_exact": (ver.get("wire") or {}).get("roundtrip_exact")}
    for attack in ("decoder", "gan"):
        res = attacks.get(attack) or {}
        m = res.get("metrics", {})
        for k in ("mse", "ssim", "psnr", "baseline_mse"):
            row[f"{attack}_{k}"] = m.get(k)
        row[f"{attack}_converged"] = res.get("converged", m.get("converged"))
        row[f"{attack}_time_s"] = res.get("timings", {}).get("total_s")
    ko = (attacks.get("knockoff") or {}).get("metrics", {})
    row["knockoff_fidelity"], row["knockoff_queries"] = ko.get("fidelity"), ko.get("queries")
    row["knockoff_clone_acc"] = ko.get("clone_acc")
    return row


def markdown(rows: list[dict]) -> str:
    """The README table: decoder MSE as a ratio to the same defense's 8-bit wire and to the
    undefended 8-bit wire (the yardstick every defense table uses)."""
    base = {r["defense"]: r for r in rows if r["bits"] == 8}
    undefended = (base.get("none") or {}).get("decoder_mse")
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    ratio = lambda v, ref: f"{v / ref:.2f}x" if v is not None and ref else "-"  # noqa: E731
    out = ["| defense | wire bits | test acc | decoder MSE | x same defense at 8 bits | x undefended 8-bit "
           "| decoder SSIM | GAN MSE | KnockoffNets fidelity | payload B/image | body B (batch 1) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ko = r["knockoff_fidelity"]
        out.append(f"| {r['defense']} | {r['bits']} | {f(r['test_acc'] and 100 * r['test_acc'], '.2f')}% | "
                   f"{f(r['decoder_mse'], '.4f')} | {ratio(r['decoder_mse'], base.get(r['defense'], {}).get('decoder_mse'))} | "
                   f"{ratio(r['decoder_mse'], undefended)} | {f(r['decoder_ssim'], '.3f')} | {f(r['gan_mse'], '.4f')} | "
                   f"{'-' if ko is None else format(100 * ko, '.2f') + '%'} | "
                   f"{r['payload_bytes_per_image']} | {r['body_bytes_batch1']} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for defense in dict.fromkeys(r["defense"] for r in rows):
        rs = sorted((r for r in rows if r["defense"] == defense), key=lambda r: r["bits"])
        x = [r["payload_bytes_per_image"] for r in rs]
        axes[0].plot(x, [100 * (r["test_acc"] or float("nan")) for r in rs], "o-", label=defense)
        axes[1].plot(x, [r["decoder_mse"] if r["decoder_mse"] is not None else float("nan") for r in rs], "o-",
                     label=defense)
        for ax, key in ((axes[0], "test_acc"), (axes[1], "decoder_mse")):
            for r, xv in zip(rs, x):
                v = r[key]
                if v is not None:
                    ax.annotate(f"{r['bits']}b", (xv, 100 * v if key == "test_acc" else v), textcoords="offset points",
                                xytext=(4, 4), fontsize=8)
        axes[2].plot([r["decoder_mse"] for r in rs], [100 * (r["test_acc"] or float("nan")) for r in rs], "o-",
                     label=defense)
        for r in rs:
            if r["decoder_mse"] is not None and r["test_acc"] is not None:
                axes[2].annotate(f"{r['bits']}b", (r["decoder_mse"], 100 * r["test_acc"]), textcoords="offset points",
                                 xytext=(4, 4), fontsize=8)
    axes[0].set(xlabel="payload bytes per image on the wire", ylabel="test accuracy (%)", title="utility")
    axes[2].set(xlabel="decoder inversion MSE (higher = more private)", ylabel="test accuracy (%)",
                title="privacy vs utility (up and right is better)")
    axes[1].set(xlabel="payload bytes per image on the wire", ylabel="decoder inversion MSE (higher = more private)",
                title="privacy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _csv_ints(text: str, what: str, allowed) -> list:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    try:
        vals = [type(next(iter(allowed)))(v) for v in vals]
    except ValueError:
        vals = [None]
    if not vals or any(v not in allowed for v in vals):
        raise argparse.ArgumentTypeError(f"--{what}: choose from {', '.join(map(str, allowed))} (comma-separated), "
                                         f"got {text!r}")
    return list(dict.fromkeys(vals))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="quick", help="quick (CI smoke) or full (default quick)")
    p.add_argument("--bits", default=None, help=f"comma-separated wire widths from {', '.join(map(str, BITS))}")
    p.add_argument("--defenses", default=None, help=f"comma-separated, from {', '.join(DEFENSES)}")
    p.add_argument("--attacks", default=None, help=f"comma-separated, from {', '.join(ATTACKS)}")
    p.add_argument("--preset", action="append", default=[], metavar="ATTACK=PRESET",
                   help="an attack's preset, e.g. decoder=fast (default: the size's)")
    p.add_argument("--base", type=Path, default=None, help="a trained base run to fine-tune (default: train one)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "wire_bits")
    p.add_argument("--runs-dir", type=Path, default=Path("runs") / "wire_bits")
    args = p.parse_args(argv)
    size = SIZES[args.size]
    try:
        args.bits = _csv_ints(args.bits, "bits", BITS) if args.bits else list(size["bits"])
        args.defenses = _csv_ints(args.defenses, "defenses", tuple(DEFENSES)) if args.defenses else list(size["defenses"])
        args.attacks = _csv_ints(args.attacks, "attacks", ATTACKS) if args.attacks else list(size["attacks"])
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.threads < 0:
        p.error("--threads must be >= 0 (0 = torch's default)")
    from qdefend.attacks.base import AttackError
    from qdefend.attacks.report import parse_presets

    try:
        args.preset = parse_presets(args.preset, ATTACKS)
    except AttackError as e:
        p.error(str(e))
    if args.base is not None and not (args.base / "config.toml").is_file():
        p.error(f"--base {args.base}: not a qdefend run (no config.toml); train one or drop --base")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from qdefend.attacks import AttackError
    from qdefend.config import RunConfig
    from qdefend.data import load_dataset
    from qdefend.edge.manifest import ArtifactError
    from qdefend.errors import QdefendError
    from qdefend.machine import load_average, machine_info
    from qdefend.run import RunPaths
    from qdefend.stages import ensure_attacks, ensure_exported, ensure_trained

    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    started, t_start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    rows: list[dict] = []
    log = lambda tag: (lambda msg: print(f"[{tag}] {msg}", file=sys.stderr, flush=True))  # noqa: E731
    try:
        base = args.base or args.runs_dir / "base"
        if args.base is None:
            ensure_trained(base, run_config(args.size, None, None, None), threads=args.threads, say=log("base"))
        data_cfg = RunConfig.from_dict(run_config(args.size, None, None, None)).data  # every row's data
        images = load_dataset(data_cfg).test.images[:64]  # what the bytes are counted on
        configs = [(d, b) for d in args.defenses for b in args.bits]
        for i, (defense, bits) in enumerate(configs, 1):
            root = args.runs_dir / f"{defense}-w{bits}"
            say = log(f"{i}/{len(configs)} {defense} {bits}-bit")
            ensure_trained(root, run_config(args.size, defense, bits, base), threads=args.threads, say=say)
            manifest = ensure_exported(root, [ARTIFACT], verify_images=size["verify_images"], say=say)
            run_holder: dict = {}
            results: dict[str, dict] = {}
            for attack in args.attacks:
                spec = f"service:{ARTIFACT}" if attack == "knockoff" else ARTIFACT
                results.update(ensure_attacks(root, spec, [attack], preset=args.preset.get(attack, size["preset"]),
                                              params={attack: size["params"].get(attack, {})},
                                              threads=args.threads or None, say=say, run_holder=run_holder))
            row = build_row(defense, bits, RunPaths(root).read_metrics(), manifest, results,
                            wire_bytes(root, ARTIFACT, images))
            rows.append(row)
            say(f"row: acc {row['test_acc']}, decoder mse {row['decoder_mse']}, knockoff {row['knockoff_fidelity']}, "
                f"{row['payload_bytes_per_image']} B/image")
    except (QdefendError, AttackError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "qdefend.wire_bits", "schema_version": 1, "started": started,
              "command": " ".join(["python", "benchmarks/wire_bits.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(), "load_average_end": load_average(),
              "settings": {"size": args.size, "bits": args.bits, "defenses": {d: DEFENSES[d] for d in args.defenses},
                           "artifact": ARTIFACT, "data": size["data"], "base_train": size["base_train"],
                           "finetune": size["finetune"], "base": str(args.base or args.runs_dir / "base"),
                           "attacks": args.attacks, "attack_presets": {a: args.preset.get(a, size["preset"] or "default")
                                                                       for a in args.attacks},
                           "attack_params": {a: size["params"].get(a, {}) for a in args.attacks},
                           "verify_images": size["verify_images"], "threads": args.threads or torch.get_num_threads(),
                           "wall_s": round(time.perf_counter() - t_start, 1)},
              "rows": rows}
    (args.out / "wire_bits.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "wire_bits.md").write_text(markdown(rows))
    plot(rows, args.out / "wire_bits.png")
    print(markdown(rows))
    print(f"wrote {args.out / 'wire_bits.json'}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
