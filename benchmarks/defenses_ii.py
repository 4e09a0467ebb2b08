"""Defenses II on Fashion-MNIST, int8: cem-slot vs cem, vib-mask vs repurposing, divqat vs extraction.

    python benchmarks/defenses_ii.py [--study cem,vib,divqat,cem-ft] [--size quick|medium]
                                     [--seeds 0,1,2] [--ablations] [--configs NAME,...]
                                     [--threads N] [--out DIR] [--runs-dir DIR]

Four studies, each a set of QAT int8 runs (``qdefend.train.Trainer``) exported to TFLite
(``qdefend.export.export_run``) and attacked through ``qdefend.attacks.runner.attack_run`` on the
int8 artifact a device ships (the stages are those of ``privacy_utility.py``, re-used):

* ``cem``: ``noise`` (sigma 0.1) vs ``noise+cem`` vs ``noise+cem-slot`` at the same lambda (16),
  and ``noise+cem-slot`` at lambda 1 (about cem's accuracy: at equal lambda cem-slot acts much
  harder, see its docstring), every seed; the black-box decoder inversion attack (He et al., ACSAC
  2019) on each; plus the training step time (median of the epochs' time per step). Ablations
  (seed 0): slot count K, gate strength, and a lambda sweep of both (cem-slot 4, cem 64 and 256).
  Papers: CEM, Xia et al., CVPR 2025 (arXiv 2503.00383); Slot Attention, Locatello et al.,
  NeurIPS 2020; gated cross-attention, Alayrac et al. (Flamingo), 2022.
* ``cem-ft``: the CEM code's short route (``pretrain=True``): the ``noise`` run of the same seed,
  fine-tuned for the size's epochs at lr 1e-3 with full lambda from the first step (cem schedule
  ``finetune``: the statistics of the trained encoder are fitted before the first step), against
  the same fine-tune without CEM (``noise-ft``, its control); lambda 16 and 64 (256: ablation).
* ``vib``: ``none`` vs ``vib-mask``, under the two protocols of the input-repurposing probe
  (attacks/repurposing.py), measured separately:
  - adaptive (the stronger adversary): linear / MLP / CNN probes trained on the released features
    of the run itself; designated accuracy and what the probes read of the within-class input
    attributes (brightness, area, vertical centroid; advantage over chance), the curve over beta;
  - frozen (the paper's): the same probes trained on the released features of the undefended
    ``none`` run of the same seed (the study's ``frozen_reference``), frozen and applied to the
    run's released features: suppression ratio = designated accuracy / best unintended accuracy.
    Controls: an undefended run of another training seed (``none-reseeded``: how much an
    independently trained encoder alone "suppresses") and the undefended fine-tune (``none-ft``).
  Ablations: beta (1e-4 .. 0.1), the mask's keep ratio, and the paper's set-up (``vib-mask-ft*``):
  the ``none`` run fine-tuned with its designated head frozen (the paper trains the encoder
  against a frozen target model), so the released features stay readable by that head.
  Paper: Guo et al., "Variational Feature Compression for Model-Specific Representations",
  arXiv 2604.06644.
* ``divqat``: plain QAT (``none``) vs ``divqat``; KnockoffNets (Orekondy et al., CVPR 2019)
  against the service (int8 encoder + cloud head, probabilities) at fixed query budgets, with and
  without a service-side output defense (``--service-output``-style, e.g. reverse sigmoid), and
  Copycat (labels only) at the same budgets: the fidelity any defense that keeps top-1 leaves to
  an attacker who keeps only the argmax. Both attacks query two pools: the attacker's aux split
  (in-distribution) and an out-of-distribution transfer set, MNIST digits (``mnist5k``, budgets
  1k/5k/10k), as the DivQAT authors' extraction work evaluates. Ablations: the divergence weight
  and temperature; the paper's frozen float reference (``divqat-frozen``: the float function after
  epoch 1); learned activation grids (LSQ) against their own plain-QAT control (``none-lsq``,
  ``divqat-lsq``, ``divqat-frozen-lsq``); and the paper's set-up, a trained float run (``float``)
  fine-tuned with QAT, the divergence measured from that float model (``divqat-qft``), against the
  plain QAT fine-tune (``none-qft``).
  Paper: Khaled et al., arXiv 2512.23948.

Sizes: ``quick`` (CI smoke: 512 training images, 2 epochs of batch 32, attack preset "quick",
seed 0) and ``medium`` (20,000 training images, 3 epochs of batch 128, so the CEM terms, which
start at epoch 2, act for two epochs; the attacks at the settings in MEDIUM_ATTACKS).

Output under --out: ``defenses_ii.json`` (rows, per-config means and standard deviations over
seeds, machine, settings), ``defenses_ii.md`` (the README tables) and accuracy-vs-privacy plots
``cem_tradeoff.png`` and ``vib_tradeoff.png``. Each row names the checkpoint attacked (the best
validation epoch among those the defense shaped). Rows are rebuilt from the
run directories, so a re-run skips every stage already done.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

from qdefend.analysis.seeds import aggregate_seeds, mean_pm as _pm  # noqa: E402

HERE = Path(__file__).resolve().parent

ARTIFACT = "encoder.int8.tflite"
SERVICE = f"service:{ARTIFACT}"
NOISE = {"sigma": 0.1}
LAM = 16.0

# name -> (defense config dict, ablation-only?)
CONFIGS: dict[str, dict[str, Any]] = {
    # -- cem study
    "noise": {"stack": "noise", "params": {"noise": NOISE}},
    "noise+cem": {"stack": "noise+cem", "params": {"noise": NOISE, "cem": {"lam": LAM}}},
    "noise+cem-slot": {"stack": "noise+cem-slot", "params": {"noise": NOISE, "cem-slot": {"lam": LAM}}},
    "noise+cem-slot-K3": {"stack": "noise+cem-slot", "params": {"noise": NOISE, "cem-slot": {"lam": LAM, "slots": 3}}},
    "noise+cem-slot-K10": {"stack": "noise+cem-slot", "params": {"noise": NOISE, "cem-slot": {"lam": LAM, "slots": 10}}},
    "noise+cem-slot-gate1": {"stack": "noise+cem-slot",
                             "params": {"noise": NOISE, "cem-slot": {"lam": LAM, "gate_init": 1.0}}},
    # lambda sweep: cem-slot at lower lambda, to compare with cem at equal accuracy
    "noise+cem-slot-lam4": {"stack": "noise+cem-slot", "params": {"noise": NOISE, "cem-slot": {"lam": 4.0}}},
    "noise+cem-slot-lam1": {"stack": "noise+cem-slot", "params": {"noise": NOISE, "cem-slot": {"lam": 1.0}}},
    # and cem at higher lambda: its batch term is damped by rho (~0.07 at batch 128), cem-slot's is not
    "noise+cem-lam64": {"stack": "noise+cem", "params": {"noise": NOISE, "cem": {"lam": 64.0}}},
    "noise+cem-lam256": {"stack": "noise+cem", "params": {"noise": NOISE, "cem": {"lam": 256.0}}},
    # -- vib and divqat studies share the undefended baseline
    "none": {"stack": "none", "params": {}},
    "vib-mask": {"stack": "vib-mask", "params": {"vib-mask": {}}},
    "vib-mask-beta1e-4": {"stack": "vib-mask", "params": {"vib-mask": {"beta": 1e-4}}},
    "vib-mask-beta3e-3": {"stack": "vib-mask", "params": {"vib-mask": {"beta": 3e-3}}},
    "vib-mask-beta0.01": {"stack": "vib-mask", "params": {"vib-mask": {"beta": 0.01}}},
    "vib-mask-beta0.1": {"stack": "vib-mask", "params": {"vib-mask": {"beta": 0.1}}},
    "vib-mask-keep0.25": {"stack": "vib-mask", "params": {"vib-mask": {"keep_ratio": 0.25}}},
    # controls of the frozen protocol: an undefended run of another training seed (SEED_OFFSET) and
    # the undefended fine-tune with the head frozen (VIB_FT)
    "none-reseeded": {"stack": "none", "params": {}},
    "none-ft": {"stack": "none", "params": {}},
    # the paper's set-up: the trained undefended run, its designated head frozen, the encoder
    # fine-tuned with the bottleneck and the mask
    "vib-mask-ft": {"stack": "vib-mask", "params": {"vib-mask": {}}},
    "vib-mask-ft-beta0.01": {"stack": "vib-mask", "params": {"vib-mask": {"beta": 0.01}}},
    "divqat": {"stack": "divqat", "params": {"divqat": {}}},
    "divqat-w3": {"stack": "divqat", "params": {"divqat": {"weight": 3.0}}},
    "divqat-T1": {"stack": "divqat", "params": {"divqat": {"temperature": 1.0}}},
    # the paper's reference, a frozen float model: from scratch, the float function after epoch 1
    "divqat-frozen": {"stack": "divqat", "params": {"divqat": {"reference": "frozen", "start_epoch": 2}}},
    # learned activation grids (LSQ), a part of the quantised network the float reference lacks;
    # none-lsq: plain QAT with the same learned grids, their control
    "none-lsq": {"stack": "none", "params": {}},
    "divqat-lsq": {"stack": "divqat", "params": {"divqat": {}}},
    "divqat-frozen-lsq": {"stack": "divqat", "params": {"divqat": {"reference": "frozen", "start_epoch": 2}}},
    # the paper's set-up: a trained float model, then QAT fine-tuning from it with the divergence
    # from that float model (frozen at the first step) against the plain QAT fine-tune
    "float": {"stack": "none", "params": {}},
    "none-qft": {"stack": "none", "params": {}},
    "divqat-qft": {"stack": "divqat", "params": {"divqat": {"reference": "frozen", "weight": 3.0}}},
    # -- cem-ft: the CEM code's pretrain route, a trained noise run fine-tuned at full lambda from the
    # first step (cem schedule "finetune"), against the same fine-tune without CEM
    "noise-ft": {"stack": "noise", "params": {"noise": NOISE}},
    "noise+cem-ft": {"stack": "noise+cem", "params": {"noise": NOISE, "cem": {"lam": LAM, "schedule": "finetune"}}},
    "noise+cem-ft-lam64": {"stack": "noise+cem",
                           "params": {"noise": NOISE, "cem": {"lam": 64.0, "schedule": "finetune"}}},
    "noise+cem-ft-lam256": {"stack": "noise+cem",
                            "params": {"noise": NOISE, "cem": {"lam": 256.0, "schedule": "finetune"}}},
}

# fine-tunes: config -> the config whose run (same seed) it starts from (--from) and its training
# overrides; the control (noise-ft) and the CEM fine-tunes share them
FT_TRAIN = {"lr": 1e-3, "select": "last"}  # the last epoch: by validation accuracy a CEM fine-tune ships its first
FINETUNES: dict[str, dict[str, Any]] = {
    name: {"from": "noise", "train": FT_TRAIN} for name in
    ("noise-ft", "noise+cem-ft", "noise+cem-ft-lam64", "noise+cem-ft-lam256")}
# the vib-mask fine-tunes train the encoder against the undefended run's frozen head (as the paper
# trains against a frozen target model); lr 1e-2: the encoder has to re-learn around the mask
VIB_FT = {"lr": 1e-2, "select": "last", "freeze": "head"}
FINETUNES.update({name: {"from": "none", "train": VIB_FT}
                  for name in ("none-ft", "vib-mask-ft", "vib-mask-ft-beta0.01")})
# QAT fine-tunes of the float run: its weights, fake quantisation from the first step, lower lr
QFT_TRAIN = {"lr": 1e-2, "select": "last"}
FINETUNES.update({name: {"from": "float", "train": QFT_TRAIN} for name in ("none-qft", "divqat-qft")})
# configs trained with the seed plus an offset: another, independently trained network
SEED_OFFSET = {"none-reseeded": 1}
# quant settings other than QAT int8 with observed grids
QUANT: dict[str, dict[str, Any]] = {"float": {"scheme": "none"},
                                    **{n: {"act_scales": "learned"} for n in ("none-lsq", "divqat-lsq",
                                                                               "divqat-frozen-lsq")}}

# The out-of-distribution transfer set of the divqat study (MNIST digits against a Fashion-MNIST victim)
OOD = "mnist5k"

STUDIES: dict[str, dict[str, Any]] = {
    # cem-slot at cem's lambda, and at lambda 1, where its accuracy is about cem's at 16 (measured)
    "cem": {"configs": ["noise", "noise+cem", "noise+cem-slot", "noise+cem-slot-lam1"],
            "ablations": ["noise+cem-slot-K3", "noise+cem-slot-K10", "noise+cem-slot-gate1", "noise+cem-slot-lam4",
                          "noise+cem-lam64", "noise+cem-lam256"],
            "attacks": {"decoder": ARTIFACT}, "reference": "noise"},
    "cem-ft": {"configs": ["noise-ft", "noise+cem-ft", "noise+cem-ft-lam64"], "ablations": ["noise+cem-ft-lam256"],
               "attacks": {"decoder": ARTIFACT}, "reference": "noise-ft"},
    "vib": {"configs": ["none", "vib-mask"],
            "ablations": ["vib-mask-beta1e-4", "vib-mask-beta3e-3", "vib-mask-beta0.01", "vib-mask-beta0.1",
                          "vib-mask-keep0.25", "none-reseeded", "none-ft", "vib-mask-ft", "vib-mask-ft-beta0.01"],
            "attacks": {"repurpose": ARTIFACT}, "frozen_reference": "none", "reference": "none"},
    "divqat": {"configs": ["none", "divqat"],
               "ablations": ["divqat-w3", "divqat-T1", "divqat-frozen", "none-lsq", "divqat-lsq", "divqat-frozen-lsq",
                             "none-qft", "divqat-qft"],
               "attacks": {"knockoff": SERVICE, "copycat": SERVICE},
               # (service output, query pool) per attack: the aux pool (in-distribution) with and
               # without reverse sigmoid, and the out-of-distribution transfer set
               "variants": {"knockoff": [(None, "aux"), ("reverse_sigmoid", "aux"), (None, OOD)],
                            "copycat": [(None, "aux"), (None, OOD)]}},
}
# The within-class input attributes of the repurposing probe: balanced inside every class, so what a
# probe reads of them is information the designated task does not need (attacks/repurposing.py).
ATTRIBUTES = ("bright_in_class", "area_in_class", "centroid_in_class")
# The targets of the vib study: the paper's protocol, a suppression ratio of at least
# "frozen_ratio" (the paper reports > 45 on CIFAR-100); the adaptive one, the best probe's advantage
# over chance on every within-class attribute at most "within_adv", with designated accuracy at
# most "acc_points" points under the undefended run's.
TARGETS = {"frozen_ratio": 10.0, "within_adv": 0.40, "acc_points": 3.0}

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"data": {"limit_train": 512, "limit_test": 300, "val_size": 200, "aux_size": 1000},
              "train": {"epochs": 2, "batch_size": 32}, "preset": "quick", "verify_images": 100, "seeds": [0]},
    "medium": {"data": {"limit_train": 20000}, "train": {"epochs": 3, "batch_size": 128}, "preset": None,
               "verify_images": 2000, "seeds": [0, 1, 2]},
}

# The attacks at --size medium. The decoder: batch 64 / lr 2e-3 reaches the default's SSIM in a
# third of the CPU time (measured on the undefended run: SSIM 0.65 in 6 epochs); 12 epochs, two noisy
# query rounds of the 5,000 aux images. Knockoff and copycat: 1k/5k/10k queries from either pool.
MEDIUM_ATTACKS: dict[str, dict[str, Any]] = {
    "decoder": {"blocks": 4, "width": 48, "epochs": 12, "lr": 2e-3, "patience": 0, "oracle_epochs": 0},  # its "fast" preset
    "repurpose": {},
    "knockoff": {"budgets": [1000, 5000, 10000]},
    "copycat": {"budgets": [1000, 5000, 10000]},
}


def run_config(name: str, size: str, seed: int, runs_dir: Path | None = None) -> dict[str, Any]:
    """The RunConfig dict of config ``name``; a fine-tune (FINETUNES) starts from its base config's
    run of the same seed under ``runs_dir``."""
    s = SIZES[size]
    ft = FINETUNES.get(name)
    cfg = {"data": {"name": "fashion-mnist", **s["data"]}, "quant": {"scheme": "int8", **QUANT.get(name, {})},
           "train": {**s["train"], "seed": seed + SEED_OFFSET.get(name, 0), **(ft["train"] if ft else {})},
           "defense": json.loads(json.dumps(CONFIGS[name]))}
    if ft:
        cfg["init_from"] = str(Path(runs_dir or ".") / run_dirname(ft["from"], seed))
    return cfg


def run_dirname(name: str, seed: int) -> str:
    return f"{name.replace('+', '_')}-s{seed}"


# ----------------------------------------------------------------------------------- rows


def step_time(records: list[dict]) -> float | None:
    """Median seconds per training step over the epochs (each epoch's train_time_s / its steps: the
    optimisation steps only, not the epoch-end hooks such as CEM's k-means or the validation)."""
    per = [float(r["train_time_s"]) / float(r["steps"]) for r in records
           if r.get("event") == "epoch" and r.get("train_time_s") and r.get("steps")]
    return statistics.median(per) if per else None


def attack_metrics(attack: str, res: dict) -> dict[str, Any]:
    """The numbers each study reports from one attack result."""
    m = res.get("metrics", {})
    if attack == "decoder":
        return {"decoder_mse": m.get("mse"), "decoder_ssim": m.get("ssim"), "decoder_floor": m.get("baseline_mse")}
    if attack == "repurpose":
        keys = ("designated_acc", "best_unintended_acc", "suppression_ratio", "suppression_ratio_adv")
        out = {k: m.get(k) for k in keys}
        same = {k: v for k, v in m.items() if k.startswith("acc_designated_")}
        out.update(same)
        out["same_task_probe_acc"] = max(same.values()) if same else None
        for task in ATTRIBUTES:  # the best probe's advantage over chance on the attribute
            accs = [v for k, v in m.items() if k.startswith(f"acc_{task}_")]
            ch = m.get(f"chance_{task}")
            out[f"{task}_adv"] = (max(accs) - ch) / (1 - ch) if accs and ch is not None and ch < 1 else None
        advs = [out[f"{t}_adv"] for t in ATTRIBUTES if out[f"{t}_adv"] is not None]
        out["within_class_adv"] = max(advs) if advs else None
        return out
    if attack == "repurpose-frozen":  # the paper's protocol: probes trained on the undefended run, frozen
        keys = ("designated_acc", "best_unintended_acc", "ref_best_unintended_acc", "suppression_ratio",
                "suppression_chance_bound", "suppression_ratio_adv", "suppression_ratio_same_task")
        out = {f"frozen_{k}": m.get(k) for k in keys}
        same = [v for k, v in m.items() if k.startswith("acc_designated_")]
        ref_same = [v for k, v in m.items() if k.startswith("ref_acc_designated_")]
        out["frozen_same_task_acc"] = max(same) if same else None
        out["frozen_ref_same_task_acc"] = max(ref_same) if ref_same else None
        return out
    if attack in ("knockoff", "copycat"):
        prefix = "" if attack == "knockoff" else "copycat_"
        return {prefix + k: v for k, v in m.items() if k.startswith(("fidelity", "clone_acc")) or k == "victim_acc"}
    return dict(m)


def build_row(study: str, name: str, seed: int, root: Path, manifest: dict,
              results: dict[str, dict[str, dict]]) -> dict[str, Any]:
    from qdefend.edge.manifest import device_accuracy
    from qdefend.run import RunPaths, train_summary

    records = RunPaths(root).read_metrics()
    summ = train_summary(records)
    checkpoint = next((r.get("checkpoint") for r in reversed(records) if r.get("event") == "test"), None)
    # test_acc: the converted int8 network with the release transform on the whole test split (the
    # trainer's final evaluation); the artifact's own figure covers only the verification images
    artifact_acc = device_accuracy(manifest, ARTIFACT)
    row = {"study": study, "config": name, "seed": seed, "defense": CONFIGS[name], "checkpoint": checkpoint,
           "test_acc": summ["test_acc_int8"] if summ["test_acc_int8"] is not None else artifact_acc,
           "test_acc_artifact": artifact_acc, "train_time_s": summ["train_time_s"],
           "step_s": step_time(records)}
    for tag, by_attack in results.items():
        for attack, res in by_attack.items():
            suffix = "" if tag == "" else f"@{tag}"
            row.update({f"{k}{suffix}": v for k, v in attack_metrics(attack, res).items()})
    return row


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds of every numeric field, per (study, config)."""
    return aggregate_seeds([{k: v for k, v in r.items() if k != "defense"} for r in rows], by=("study", "config"))


def divqat_table(aggs: list[dict]) -> list[str]:
    """KnockoffNets fidelity per config: the aux pool (in-distribution) and the OOD transfer set
    (``@mnist5k``), each against its plain-QAT control (none; none-lsq for the learned-grid
    configs, none-qft for the fine-tunes from the float run); reverse sigmoid and the labels-only
    bound (copycat) beside them."""
    def budgets(suffix: str) -> list[int]:
        pat = re.compile(r"fidelity@(\d+)" + re.escape(suffix))
        return sorted({int(m[1]) for a in aggs for k in a if (m := pat.fullmatch(k))})

    control = {a["config"]: a for a in aggs}
    ood = f"@{OOD}"
    ib, ob = budgets(""), budgets(ood)
    top_i, top_o = (f"fidelity@{ib[-1]}" if ib else None), (f"fidelity@{ob[-1]}{ood}" if ob else None)
    head = " | ".join([f"aux fid@{b} (%)" for b in ib] + [f"OOD fid@{b} (%)" for b in ob])
    out = [f"| config | seeds | test acc (%) | {head} | x control (aux / OOD) | aux, reverse sigmoid (%) | "
           f"copycat aux / OOD (%) |",
           "|---|---|---|" + "---|" * (len(ib) + len(ob)) + "---|---|---|"]
    for a in aggs:
        name = a["config"]
        ref = control.get("none-lsq" if "lsq" in name else "none-qft" if name.endswith("-qft") else "none")
        cells = " | ".join([_pm(a, f"fidelity@{b}", ".2f", 100) for b in ib]
                           + [_pm(a, f"fidelity@{b}{ood}", ".2f", 100) for b in ob])
        ratios = [f"{a[k] / ref[k]:.3f}x" if k and ref and k in a and k in ref else "-" for k in (top_i, top_o)]
        rs = _pm(a, f"{top_i}@reverse_sigmoid", ".2f", 100) if top_i else "-"
        cc = " / ".join(_pm(a, f"copycat_{k}", ".2f", 100) if k else "-" for k in (top_i, top_o))
        out.append(f"| {name} | {len(a['seeds'])} | {_pm(a, 'test_acc', '.2f', 100)} | {cells} | "
                   f"{' / '.join(ratios)} | {rs} | {cc} |")
    out.append("")
    return out


def markdown(aggs: list[dict]) -> str:
    """One table per study (mean ± std over the seeds given in the seeds column)."""
    out: list[str] = []
    by = {}
    for a in aggs:
        by.setdefault(a["study"], []).append(a)
    for study in ("cem", "cem-ft"):
        if study not in by:
            continue
        ref_name = STUDIES[study]["reference"]
        ref = next((a.get("decoder_mse") for a in by[study] if a["config"] == ref_name), None)
        out += [f"| config | seeds | test acc (%) | decoder MSE | x {ref_name} | decoder SSIM | step ms |",
                "|---|---|---|---|---|---|---|"]
        for a in by[study]:
            ratio = f"{a['decoder_mse'] / ref:.2f}x" if ref and "decoder_mse" in a else "-"
            out.append(f"| {a['config']} | {len(a['seeds'])} | {_pm(a, 'test_acc', '.2f', 100)} | "
                       f"{_pm(a, 'decoder_mse', '.4f')} | {ratio} | {_pm(a, 'decoder_ssim', '.3f')} | "
                       f"{_pm(a, 'step_s', '.0f', 1000)} |")
        out.append("")
    if "vib" in by:
        out += vib_tables(by["vib"])
    if "divqat" in by:
        out += divqat_table(by["divqat"])
    return "\n".join(out)


def _points(a: dict, key: str, ref: float | None) -> str:
    """a[key] - ref in percentage points, signed ("-" when either is missing)."""
    return "-" if ref is None or key not in a else f"{100 * (a[key] - ref):+.2f}"


def vib_tables(aggs: list[dict]) -> list[str]:
    """The vib study's two tables: the paper's (frozen) protocol, then the adaptive one, each with
    a column saying whether the row meets its TARGETS (mean ± std over the seeds column)."""
    t = TARGETS
    ref = next((a for a in aggs if a["config"] == STUDIES["vib"]["reference"]), None)
    ref_acc = ref.get("designated_acc") if ref else None
    out = [f"Paper protocol (frozen probes trained on the undefended run's released features; target: "
           f"suppression ratio >= {t['frozen_ratio']:g}x):", "",
           "| config | seeds | designated acc, head (%) | best unintended, on the undefended features (%) | "
           "best unintended, on this run's features (%) | suppression ratio | ratio if all at chance | "
           "same task, frozen probes (%) | same-task ratio | meets target |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for a in aggs:
        if "frozen_suppression_ratio" not in a:
            continue
        met = "yes" if a["frozen_suppression_ratio"] >= t["frozen_ratio"] else "no"
        cells = [_pm(a, "frozen_designated_acc", ".2f", 100), _pm(a, "frozen_ref_best_unintended_acc", ".2f", 100),
                 _pm(a, "frozen_best_unintended_acc", ".2f", 100), _pm(a, "frozen_suppression_ratio", ".2f"),
                 _pm(a, "frozen_suppression_chance_bound", ".2f"), _pm(a, "frozen_same_task_acc", ".2f", 100),
                 _pm(a, "frozen_suppression_ratio_same_task", ".2f"), met]
        out.append(f"| {a['config']} | {len(a['seeds'])} | " + " | ".join(cells) + " |")
    out += ["", f"Adaptive protocol (probes retrained on this run's released features; target: every "
                f"within-class attribute's advantage <= {t['within_adv']:.2f} at designated accuracy within "
                f"{t['acc_points']:g} points of {STUDIES['vib']['reference']}):", "",
            "| config | seeds | designated acc, head (%) | vs none (points) | same task, best fresh probe (%) | "
            "bright in class (adv.) | area in class (adv.) | centroid in class (adv.) | worst within-class (adv.) | "
            "meets target |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for a in aggs:
        if "designated_acc" not in a:
            continue
        ok_acc = ref_acc is not None and 100 * (ref_acc - a["designated_acc"]) <= t["acc_points"]
        met = "yes" if ok_acc and a.get("within_class_adv", 1.0) <= t["within_adv"] else "no"
        out.append(f"| {a['config']} | {len(a['seeds'])} | {_pm(a, 'designated_acc', '.2f', 100)} | "
                   f"{_points(a, 'designated_acc', ref_acc)} | {_pm(a, 'same_task_probe_acc', '.2f', 100)} | "
                   f"{_pm(a, 'bright_in_class_adv', '.3f')} | {_pm(a, 'area_in_class_adv', '.3f')} | "
                   f"{_pm(a, 'centroid_in_class_adv', '.3f')} | {_pm(a, 'within_class_adv', '.3f')} | {met} |")
    out.append("")
    return out


PLOTS = {  # study -> (x key, y key, file, x label, y label, title, lowest y shown)
    "cem": ("decoder_mse", "test_acc", "cem_tradeoff.png", "decoder MSE (higher = more private)",
            "test accuracy", "cem vs cem-slot: accuracy vs decoder MSE (int8, mean over seeds)", 0.0),
    "cem-ft": ("decoder_mse", "test_acc", "cem_finetune.png", "decoder MSE (higher = more private)",
               "test accuracy", "CEM fine-tune vs its noise-only control (int8, mean over seeds)", 0.0),
}
VIB_PLOT = "vib_tradeoff.png"


def _beta(a: dict) -> float:
    """The vib-mask beta of an aggregate's config (0 for the undefended ones)."""
    p = CONFIGS[a["config"]]["params"].get("vib-mask")
    if p is None:
        return 0.0
    from qdefend.defenses.vib import VIBMaskConfig

    return float(p.get("beta", VIBMaskConfig.beta))


def vib_plot(aggs: list[dict], path: Path) -> Path | None:
    """Designated accuracy vs the worst within-class attribute leak (adaptive protocol), one curve
    over beta per family (trained from scratch; fine-tuned with the head frozen), the target region
    shaded. Configs with another keep ratio are single points; runs under 50% accuracy are left out."""
    from matplotlib.figure import Figure

    pts = [a for a in aggs if a["study"] == "vib" and "within_class_adv" in a and a.get("designated_acc", 0) >= 0.5]
    ref = next((a for a in pts if a["config"] == STUDIES["vib"]["reference"]), None)
    if not pts:
        return None
    fig = Figure(figsize=(7.6, 5.0), dpi=100)
    ax = fig.subplots()
    families = {"from scratch (beta sweep)": [a for a in pts if not a["config"].startswith(("none-", "vib-mask-ft"))
                                              and "keep" not in a["config"]],
                "fine-tuned, head frozen (beta sweep)": [a for a in pts if a["config"] in ("none-ft", "vib-mask-ft")
                                                         or a["config"].startswith("vib-mask-ft-beta")],
                "other": [a for a in pts if "keep" in a["config"] or a["config"] == "none-reseeded"]}
    for (label, group), color in zip(families.items(), ("#1f77b4", "#d62728", "0.45")):
        group = sorted(group, key=_beta)
        if not group:
            continue
        xs, ys = [a["within_class_adv"] for a in group], [a["designated_acc"] for a in group]
        ax.errorbar(xs, ys, xerr=[a.get("within_class_adv_std") or 0 for a in group],
                    yerr=[a.get("designated_acc_std") or 0 for a in group], fmt="o-" if label != "other" else "o",
                    color=color, label=label, capsize=3, ms=5)
        for a, x, y in zip(group, xs, ys):
            ax.annotate(a["config"], (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7)
    t = TARGETS
    ax.axvline(t["within_adv"], color="green", ls="--", lw=1)
    if ref is not None:
        floor = ref["designated_acc"] - t["acc_points"] / 100
        ax.axhline(floor, color="green", ls="--", lw=1)
        ax.fill_between([0, t["within_adv"]], floor, 1.0, color="green", alpha=0.08,
                        label=f"target: adv. <= {t['within_adv']:.2f}, acc >= none - {t['acc_points']:g} pts")
    ys_all = [a["designated_acc"] for a in pts]
    ax.set_ylim(min(ys_all) - 0.02, max(ys_all) + 0.02)
    ax.set_xlim(min(0.0, *[a["within_class_adv"] for a in pts]) - 0.02, max(a["within_class_adv"] for a in pts) + 0.08)
    ax.set_xlabel("worst within-class attribute leak: best retrained probe's advantage over chance")
    ax.set_ylabel("designated accuracy (frozen head, released int8 features)")
    ax.set_title("vib-mask, adaptive protocol: accuracy vs within-class leak (Fashion-MNIST, int8)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plots(aggs: list[dict], out: Path) -> list[Path]:
    """One accuracy-vs-privacy scatter per study in PLOTS that has rows (per-config means, with the
    standard deviation over seeds as error bars)."""
    from qdefend.analysis.plot import scatter_plot

    paths = []
    for study, (xk, yk, name, xl, yl, title, lo) in PLOTS.items():
        pts = [(a["config"], a[xk], a[yk], a.get(f"{xk}_std"), a.get(f"{yk}_std")) for a in aggs
               if a["study"] == study and xk in a and yk in a and a[yk] >= lo]  # error bars: std over seeds
        if pts:
            paths.append(scatter_plot(pts, out / name, xlabel=xl, ylabel=yl, title=title))
    vib = vib_plot(aggs, out / VIB_PLOT)
    return paths + ([vib] if vib else [])


# ----------------------------------------------------------------------------------- main


def _attack_all(root: Path, study: dict, size: dict, threads: int, say) -> dict[str, dict[str, dict]]:
    """Attack results keyed by service-output tag ("" = none) then attack name."""
    from qdefend.stages import ensure_attacks

    preset = size["preset"]
    params = {} if preset else MEDIUM_ATTACKS
    holder: dict = {}
    out: dict[str, dict[str, dict]] = {}
    for attack, spec in study["attacks"].items():
        if spec == ARTIFACT:
            out.setdefault("", {}).update(ensure_attacks(root, spec, (attack,), preset=preset, params=params,
                                                         threads=threads or None, say=say, run_holder=holder))
            continue
        for so, pool in study.get("variants", {}).get(attack, [(None, "aux")]):
            tag = "+".join(t for t in (so, "" if pool == "aux" else pool) if t)
            kw = dict(params.get(attack, {}), **({} if pool == "aux" else {"pool": pool}))
            out.setdefault(tag, {}).update(ensure_attacks(root, spec, (attack,), preset=preset, params={attack: kw},
                                                          threads=threads or None, say=say, run_holder=holder,
                                                          service_output=so))
    return out


def _frozen_attack(root: Path, ref_root: Path, size: dict, threads: int, say) -> dict:
    """The repurposing attack under the paper's protocol (probes trained on ``ref_root``'s released
    features, frozen) on the run at ``root``: the runner keeps it as its own result (variant
    "frozen") and re-uses it while the config, seed, preset and both runs' checkpoints and
    artifacts are unchanged."""
    from qdefend.stages import ensure_attacks

    preset = size["preset"]
    kw = {**({} if preset else MEDIUM_ATTACKS["repurpose"]), "reference": str(ref_root)}
    return ensure_attacks(root, ARTIFACT, ("repurpose",), preset=preset, params={"repurpose": kw},
                          threads=threads or None, say=say)["repurpose"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="cem,vib,divqat", help=f"comma-separated, from {', '.join(STUDIES)}")
    p.add_argument("--size", choices=list(SIZES), default="quick")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default: the size's)")
    p.add_argument("--ablations", action="store_true", help="also the ablation configs (seed 0 only)")
    p.add_argument("--configs", default=None, help="only these configs of the studies (comma-separated)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "defenses_ii")
    p.add_argument("--runs-dir", type=Path, default=Path("runs") / "defenses_ii")
    a = p.parse_args(argv)
    a.study = [s.strip() for s in a.study.split(",") if s.strip()]
    bad = [s for s in a.study if s not in STUDIES]
    if bad or not a.study:
        p.error(f"--study: unknown {bad or a.study}; choose from {', '.join(STUDIES)}")
    try:
        a.seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(SIZES[a.size]["seeds"])
    except ValueError:
        p.error("--seeds: comma-separated integers, e.g. --seeds 0,1,2")
    if a.configs:
        a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
        bad = [c for c in a.configs if c not in CONFIGS]
        if bad:
            p.error(f"--configs: unknown {bad[0]}; choose from {', '.join(CONFIGS)}")
    if a.threads < 0:
        p.error("--threads must be >= 0 (0 = torch's default)")
    return a


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(study, config, seed) in run order: main configs for every seed, then ablations at seed 0."""
    jobs = []
    for study in args.study:
        st = STUDIES[study]
        for seed in args.seeds:
            jobs += [(study, c, seed) for c in st["configs"]]
        if args.ablations:
            jobs += [(study, c, args.seeds[0]) for c in st["ablations"]]
    if args.configs:
        jobs = [j for j in jobs if j[1] in args.configs]
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from qdefend.attacks import AttackError
    from qdefend.machine import load_average, machine_info
    from qdefend.stages import ensure_exported, ensure_trained
    from qdefend.edge.manifest import ArtifactError
    from qdefend.errors import QdefendError

    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    jobs = plan(args)
    rows: list[dict] = []
    try:
        for i, (study, name, seed) in enumerate(jobs, 1):
            root = args.runs_dir / run_dirname(name, seed)
            say = lambda msg, tag=f"[{i}/{len(jobs)} {study}:{name} seed {seed}]": print(  # noqa: E731
                f"{tag} {msg}", file=sys.stderr, flush=True)
            if name in FINETUNES:  # its base run first (the same seed), then the fine-tune --from it
                base = FINETUNES[name]["from"]
                ensure_trained(args.runs_dir / run_dirname(base, seed), run_config(base, args.size, seed),
                               threads=args.threads, say=say)
            ensure_trained(root, run_config(name, args.size, seed, args.runs_dir), threads=args.threads, say=say)
            manifest = ensure_exported(root, [ARTIFACT], verify_images=size["verify_images"], say=say)
            results = _attack_all(root, STUDIES[study], size, args.threads, say)
            ref = STUDIES[study].get("frozen_reference")
            if ref is not None:  # the paper's protocol: probes trained on the undefended run of the same seed
                ref_root = args.runs_dir / run_dirname(ref, seed)
                ensure_trained(ref_root, run_config(ref, args.size, seed), threads=args.threads, say=say)
                ensure_exported(ref_root, [ARTIFACT], verify_images=size["verify_images"], say=say)
                results.setdefault("", {})["repurpose-frozen"] = _frozen_attack(root, ref_root, size, args.threads,
                                                                                say)
            rows.append(build_row(study, name, seed, root, manifest, results))
    except (QdefendError, AttackError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    aggs = aggregate(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "qdefend.defenses_ii", "schema_version": 1, "started": started,
              "command": " ".join(["python", "benchmarks/defenses_ii.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(), "load_average_end": load_average(),
              "settings": {"size": args.size, "studies": args.study, "seeds": args.seeds, "ablations": args.ablations,
                           "data": size["data"], "train": size["train"], "attack_preset": size["preset"] or "default",
                           "attack_params": {} if size["preset"] else MEDIUM_ATTACKS,
                           "threads": args.threads or torch.get_num_threads(), "runs_dir": str(args.runs_dir),
                           "wall_s": round(time.perf_counter() - t0, 1)},
              "rows": rows, "aggregates": aggs}
    (args.out / "defenses_ii.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = markdown(aggs)
    (args.out / "defenses_ii.md").write_text(md)
    print(md)
    pngs = plots(aggs, args.out)
    print(f"wrote {args.out / 'defenses_ii.json'}, defenses_ii.md" + "".join(f", {p.name}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
