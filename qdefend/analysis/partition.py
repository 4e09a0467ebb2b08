"""Where to cut: R_c^2 / GPZ, cost, entropy estimate, int8 similarity and attack MSE at every cut.

:func:`analyze_partition` builds the model with the deepest cut and no bottleneck (every stage on
the "edge", so ``stage_outputs`` gives what each cut k would release without a bottleneck), trains
it briefly with :class:`qdefend.train.Trainer` into ``OUT/model`` (a normal run directory, reused
when it is already there), then, streaming once over the evaluation split (the test set):

* R_c^2 per cut with true and with predicted labels, their relative drops and the Golden
  Partition Zone (:mod:`.radius`, on ``zone_labels``);
* encoder MACs, parameters and int8 size (1 byte per parameter; BN folds into the convs at
  conversion, so it is a slight over-estimate) of the edge at that cut;
* with sigma > 0, an estimate of H(x | z~) and the CEM MSE bound it implies (:mod:`.entropy`);
* float-vs-int8 channel KL per cut and KL between adjacent cuts (:mod:`.similarity`);
* with ``attack``, the MSE / PSNR / SSIM of the black-box decoder attack at every cut: the same
  ``train_decoder`` as ``qdefend attack --attack decoder``, trained on (stage features of aux
  images, aux images) with the same :class:`DecoderConfig` at every cut so the numbers compare,
  noise-aware when sigma > 0, and evaluated on the first ``decoder.n_eval`` test images.

``from_run`` (``--from RUN``, see :mod:`.model`) loads the run's trained edge -- its stem and
stages 1..cut, float weights (a QAT run's weights before fake quantisation) -- into the analysis
model and freezes it (weights and BN statistics) while the deeper stages and the classifier train.
So cuts <= the run's cut show exactly the run's edge features *before its bottleneck and
sigmoid*; deeper cuts come from the briefly trained continuation. Width and data split come from
the run, and sigma defaults to the run's Gaussian noise sigma (other defenses are not modelled).

Paper: Liu et al., "Partitioning for Intrinsic Model Inversion Resistance in Collaborative
Inference" (GPZ), arXiv 2506.15412; Xia et al., CEM, CVPR 2025 (arXiv 2503.00383) for the bound;
Sanyal et al., KLAS, ICLR 2026 for the layer KL; He et al., ACSAC 2019 for the decoder attack.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checks import check_choice, check_number
from ..attacks.inversion.decoder import DecoderConfig, build_decoder, decode, eval_indices, train_decoder
from ..errors import QdefendError
from . import entropy as ent
from .model import ensure_model, plan_analysis, say as _say
from .radius import FLAT, RadiusAccumulator, locate_zone
from .similarity import float_int8_kl, int8_stage_chain, neighbour_kl, pooled_channel_kl
from ..models import MODELS, count_macs, count_params, stage_outputs, valid_cuts
from ..attacks.metrics import image_metrics, mean_image_baseline
from ..data import DATASETS, batches, load_dataset

__all__ = ["PartitionConfig", "analyze_partition", "DECODER_BUDGET", "RESULT_VERSION"]

RESULT_VERSION = 1
# The same decoder at every cut, so the MSEs compare across cuts: the plain decoder, 5 epochs on
# 2,000 aux images (fresh noise each batch when sigma > 0), measured ~60 s per epoch for the 8 VGG11
# cuts (width 0.5) and ~20 s for the 9 ResNet-20 cuts on one (shared) CPU thread. It is a relative
# yardstick between cuts, far lighter than the attack's full-strength default (CEM's residual decoder,
# 50 epochs on 9,000 images): read its MSEs as lower bounds on what leaks at each cut.
DECODER_BUDGET = {"arch": "plain", "blocks": 0, "epochs": 5, "aux_size": 2000, "protocol": "train_time",
                  "batch_size": 64, "lr": 2e-3, "width": 16, "n_eval": 500, "oracle_epochs": 0, "keep_images": 8,
                  "weight_decay": 0.0, "patience": 0, "device": "cpu", "augment": "none"}


@dataclass
class PartitionConfig:
    """What ``qdefend partition`` analyses, and its budget.

    Budget: defaults keep ``--attack`` under 15 minutes on 2 CPU cores for vgg11_bn and resnet20
    on Fashion-MNIST. The analysis model trains for 1 epoch on 20,000 training images at width
    0.5 (0.8 s per 128-image VGG11 step on one thread, 3.8 s at full width; ResNet-20 0.3 s), and
    the decoder uses DECODER_BUDGET at every cut (5 epochs on 2,000 aux images). Measured with
    ``--attack`` on 2 otherwise idle cores: vgg11_bn 5.2 min (train 2.1, R_c^2 0.3, KL 0.1,
    decoders 2.5), resnet20 1.8 min (2.9 min with ``--epochs 3``).
    ``model``/``dataset``/``width`` None: vgg11_bn, fashion-mnist, 0.5, or the ``from_run``'s.
    ``sigma`` None: the ``from_run``'s Gaussian noise sigma, else 0 (entropy bound vacuous).
    """

    model: str | None = None
    dataset: str | None = None
    data_dir: str | None = None
    width: float | None = None
    epochs: int = 1
    limit_train: int | None = 20000
    batch_size: int = 128
    lr: float = 0.05
    seed: int = 0
    from_run: str | None = None
    sigma: float | None = None
    limit_eval: int | None = None  # first N test images (R_c^2, entropy, similarity, decoder eval)
    zone_labels: str = "predicted"  # GPZ on R_c^2 of "predicted" (as their code) or "true" labels
    flat: float = FLAT
    entropy_samples: int = 1024
    similarity: bool = True
    similarity_samples: int = 256
    attack: bool = False
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(**DECODER_BUDGET))
    out: str | None = None

    def __post_init__(self):
        if self.model is not None:
            MODELS.get(self.model)  # unknown -> lists the valid models
        if self.dataset is not None:
            DATASETS.get(self.dataset)
        if isinstance(self.decoder, dict):
            self.decoder = DecoderConfig(**{**DECODER_BUDGET, **self.decoder})
        numbers = [  # name, bounds, the fix
            ("epochs", dict(lo=1, integer=True), "--epochs 1"),
            ("width", dict(lo=0, lo_open=True), "--width 0.5"),
            ("limit_train", dict(lo=1, integer=True), "--limit-train 20000"),
            ("limit_eval", dict(lo=2, integer=True), "--limit-eval 1000"),
            ("batch_size", dict(lo=1, integer=True), "PartitionConfig(batch_size=128)"),
            ("lr", dict(lo=0, lo_open=True), "PartitionConfig(lr=0.05)"),
            ("sigma", dict(lo=0), "--sigma 0.1 (or 0 for no noise)"),
            ("flat", dict(lo=0, hi=1, lo_open=True, hi_open=True), "PartitionConfig(flat=0.2)"),
            ("entropy_samples", dict(lo=2, integer=True), "PartitionConfig(entropy_samples=1024)"),
            ("similarity_samples", dict(lo=3, integer=True), "PartitionConfig(similarity_samples=256)"),
        ]
        for name, bounds, fix in numbers:
            if getattr(self, name) is not None:
                check_number(getattr(self, name), f"partition {name}", **bounds, fix=fix)
        check_choice(self.zone_labels, "partition zone_labels", ("predicted", "true"),
                     fix="PartitionConfig(zone_labels='predicted')")
        if self.from_run is not None and not (Path(self.from_run) / "config.toml").is_file():
            raise QdefendError(f"--from {self.from_run} is not a run directory (no config.toml): "
                               "pass a folder made by `qdefend train`, e.g. --from runs/demo")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- helpers


@contextmanager
def _bar(console, enabled: bool, desc: str, total: int):
    """A transient rich progress bar; yields ``step(advance=1, description=None)``."""
    if not enabled or console is None:
        yield lambda advance=1, description=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as p:
        task = p.add_task(desc, total=total)
        yield lambda advance=1, description=None: p.update(
            task, advance=advance, **({"description": description} if description else {}))


def _prefix(encoder: nn.Sequential, k: int) -> nn.Sequential:
    """The edge at cut k: stem (if any) and stages 1..k of the analysis encoder (shared modules)."""
    keep = {f"stage{i}" for i in range(1, k + 1)} | {"stem"}
    return nn.Sequential(*[m for n, m in encoder.named_children() if n in keep])


def _noisy(z: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    if sigma == 0:
        return z
    g = torch.Generator().manual_seed(seed)
    return (torch.from_numpy(z) + sigma * torch.randn(z.shape, generator=g)).numpy()


@torch.no_grad()
def _stage_features(net, x01: np.ndarray, norm, keys: list[str], batch: int = 256) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for i in range(0, len(x01), batch):
        o = stage_outputs(net, torch.from_numpy(norm.apply(x01[i:i + batch])))
        for k in keys:
            out[k].append(o[k].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- the analysis


def analyze_partition(cfg: PartitionConfig, *, console=None, progress: bool = True, save: bool = True) -> dict:
    """Run the whole analysis (see the module docstring); returns the JSON-ready result and, with
    ``save``, writes OUT/partition.json, OUT/partition.png (and OUT/reconstructions.png)."""

    t_start = time.perf_counter()
    plan = plan_analysis(cfg)
    timings: dict[str, float] = {}
    data = load_dataset(plan.run_cfg.data)
    run, test_acc, timings["train_s"] = ensure_model(plan, data, console, progress)
    net, norm = run.net.eval(), data.normalization
    name = plan.run_cfg.model.name
    cuts = valid_cuts(name)
    keys = [f"stage{k}" for k in cuts]
    sigma, split = plan.sigma, data.test
    in_shape, d_pix = tuple(data.shape), int(np.prod(data.shape))

    # -- one streaming pass: R_c^2 (true / predicted), pixel covariance, entropy samples
    t0 = time.perf_counter()
    acc_t = {k: RadiusAccumulator(data.num_classes) for k in keys}
    acc_p = {k: RadiusAccumulator(data.num_classes) for k in keys}
    pix = ent.MomentAccumulator()
    keep: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    n_keep, correct, bs = (cfg.entropy_samples if sigma > 0 else 0), 0, 256
    with _bar(console, progress, f"R_c^2 over {len(split)} test images", -(-len(split) // bs)) as step, torch.no_grad():
        seen = 0
        for xb, yb in batches(split, bs, shuffle=False):
            o = stage_outputs(net, torch.from_numpy(norm.apply(xb)))
            pred = o["logits"].argmax(1)
            correct += int((pred.numpy() == yb).sum())
            for k in keys:
                acc_t[k].update(o[k], yb)
                acc_p[k].update(o[k], pred)
                if seen < n_keep:
                    keep[k].append(o[k][: n_keep - seen].clone())
            pix.update(xb)
            seen += len(yb)
            step()
    r2_true = [acc_t[k].value() for k in keys]
    r2_pred = [acc_p[k].value() for k in keys]
    zone = locate_zone(r2_pred if cfg.zone_labels == "predicted" else r2_true, flat=cfg.flat)
    drops_t, drops_p = locate_zone(r2_true, flat=cfg.flat).drops, locate_zone(r2_pred, flat=cfg.flat).drops
    timings["radius_s"] = time.perf_counter() - t0

    # -- entropy estimate per cut
    t0 = time.perf_counter()
    h_x = ent.gaussian_entropy(pix.covariance())
    ests = {}
    for k in keys:
        z = torch.cat(keep.pop(k)) if sigma > 0 else torch.zeros(2, 1)
        ests[k] = ent.estimate_entropy(h_x, z, sigma, d_pix) if sigma > 0 else \
            ent.EntropyEstimate(sigma, h_x, float("inf"), float("-inf"), 0.0, 0, True)
    timings["entropy_s"] = time.perf_counter() - t0

    # -- float vs int8 and adjacent-cut similarity
    kl_q: dict[str, float] = {}
    kl_nb: dict[str, float | None] = {}
    kl_ch: dict[str, float | None] = {}
    if cfg.similarity:
        t0 = time.perf_counter()
        n_sim = min(cfg.similarity_samples, len(data.aux), len(split))
        _say(console, f"int8 similarity: post-training quantising {len(list(net.encoder.children()))} stages "
             f"(calibrated on {n_sim} aux images)")
        chain = int8_stage_chain(net.encoder, torch.from_numpy(norm.apply(data.aux.floats(slice(0, n_sim)))))
        x_sim = torch.from_numpy(norm.apply(split.floats(slice(0, n_sim))))
        kl_q = float_int8_kl(net.encoder, chain, x_sim)
        with torch.no_grad():
            o = stage_outputs(net, x_sim)
        for a, b in zip(keys[:-1], keys[1:]):
            kl_nb[a], kl_ch[a] = neighbour_kl(o[a], o[b]), pooled_channel_kl(o[a], o[b])
        timings["similarity_s"] = time.perf_counter() - t0

    # -- the decoder attack at every cut
    attack: dict[str, dict[str, float]] = {}
    baseline, grid = None, []
    if cfg.attack:
        t0 = time.perf_counter()
        dcfg, seed = cfg.decoder, cfg.seed
        n_train = min(dcfg.aux_size or len(data.aux), len(data.aux))
        x_aux = data.aux.floats(slice(0, n_train))
        idx = eval_indices(data, dcfg.n_eval)
        x_test = split.floats(idx)
        baseline = mean_image_baseline(x_aux, x_test)
        simulate = None if sigma == 0 else (lambda zb, g: zb + sigma * torch.randn(zb.shape, generator=g))
        _say(console, f"decoder attack at {len(keys)} cuts: {dcfg.arch} decoder, {n_train} aux images"
             f"{' (fresh noise each batch)' if sigma else ''}, {dcfg.epochs} epochs, width {dcfg.width}; "
             f"{len(x_test)} test images inverted")
        f_aux, f_test = _stage_features(net, x_aux, norm, keys), _stage_features(net, x_test, norm, keys)
        grid = [("private test images", x_test[: dcfg.keep_images])]
        with _bar(console, progress, "decoder", len(keys) * dcfg.epochs) as step:
            for k in keys:
                z = f_aux.pop(k)
                say = lambda m, k=k: step(description=f"decoder {k}: {m}")  # noqa: E731
                dec = build_decoder(dcfg, z.shape[1:], in_shape, seed)
                dec, _ = train_decoder(dec, z, x_aux, dcfg, seed, simulate=simulate, say=say)
                recon = decode(dec, _noisy(f_test.pop(k), sigma, seed * 1000 + 999_983))
                attack[k] = image_metrics(x_test, recon)
                grid.append((f"{k}: mse {attack[k]['mse']:.4f}", recon[: dcfg.keep_images]))
        timings["attack_s"] = time.perf_counter() - t0

    # -- assemble
    with torch.no_grad():
        shapes = {k: list(v.shape[1:]) for k, v in stage_outputs(net, torch.zeros(1, *in_shape)).items()}
    rows = []
    for i, (c, k) in enumerate(zip(cuts, keys)):
        edge = _prefix(net.encoder, c)
        e = ests[k]
        row: dict[str, Any] = {
            "cut": c, "layer": k, "shape": shapes[k],
            "r2_true": r2_true[i], "r2_pred": r2_pred[i],
            "drop_true": drops_t[i - 1] if i else None, "drop_pred": drops_p[i - 1] if i else None,
            "zone": "GPZ" if zone.primary.start <= i <= zone.primary.end else
                    ("GPZ-2" if zone.second and zone.second.start <= i <= zone.second.end else ""),
            "macs": count_macs(edge, in_shape), "params": count_params(edge), "int8_bytes": count_params(edge),
            "kl_float_int8": kl_q.get(k), "kl_next": kl_nb.get(k), "kl_next_channel": kl_ch.get(k),
            "entropy": e.to_dict(), "mse_bound": None if e.vacuous else e.bound,
            "from_run": bool(plan.from_cut and c <= plan.from_cut),
        }
        if k in attack:
            row["attack"] = attack[k]
            row["loose"] = (not e.vacuous) and e.bound > attack[k]["mse"]
        rows.append(row)
    z_of = lambda zn: None if zn is None else {  # noqa: E731
        "start_cut": cuts[zn.start], "end_cut": cuts[zn.end], "drop": zn.drop}
    notes = list(plan.notes) + zone.notes
    notes.append("MSE bound: " + (ests[keys[0]].note if keys else ""))
    if plan.from_cut:
        notes.append(f"--from {cfg.from_run}: cuts 1..{plan.from_cut} are the run's trained edge (before its "
                     "bottleneck); deeper cuts were trained here on top of it")
    if cfg.similarity:
        notes.append("KL float||int8: channel softmax per position, int8 = per-stage PTQ chained; KL->next: "
                     "SNE-style neighbour distributions over images between adjacent cuts")
    timings["total_s"] = time.perf_counter() - t_start
    result = {
        "version": RESULT_VERSION, "kind": "partition", "config": cfg.to_dict(),
        "resolved": {"model": name, "dataset": data.name, "width": plan.run_cfg.model.width, "sigma": sigma,
                     "from_run": cfg.from_run, "from_cut": plan.from_cut, "model_dir": str(plan.out / "model"),
                     "zone_labels": cfg.zone_labels, "flat": cfg.flat},
        "eval": {"split": "test", "images": len(split), "accuracy": correct / max(len(split), 1),
                 "test_acc_float": test_acc, "pixel_entropy_nats": h_x, "pixels": d_pix},
        "zone": {"primary": z_of(zone.primary), "second": z_of(zone.second)},
        "cuts": rows, "baseline": baseline, "notes": notes,
        "timings": {k: round(v, 2) for k, v in timings.items()}, "out": str(plan.out),
    }
    if save:
        from .report import save_report

        result["files"] = save_report(result, plan.out, grid=grid)
    return result

