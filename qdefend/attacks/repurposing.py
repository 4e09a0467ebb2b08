"""Input repurposing probe: can fresh classifiers use the released features for other purposes?

A defense like Guo et al.'s variational bottleneck wants the released features to serve one
designated (frozen) classifier and nothing else. The adversary here holds the released features
of its own images (the aux split, release transform on, exactly what the cloud receives) and
trains *fresh* classifiers on them: three architectures (a linear probe, an MLP, a small CNN on
the feature map) for several tasks:

* ``designated``: the victim's own task (its class labels);
* class groupings derived from the labels (Fashion-MNIST: ``footwear`` = sandal/sneaker/ankle
  boot vs the rest, ``upper_body`` = T-shirt/pullover/coat/shirt vs the rest; MNIST: ``odd``,
  ``large`` (>= 5); CIFAR-10: ``vehicle``; any other data set: class-index ``parity`` and
  ``upper_half``), replaced by ``groups`` (name -> positive classes, "footwear=5,7,9;bags=8")
  and/or ``mappings`` (name -> one new label per class) when given;
* with ``attributes``, properties of the input rather than of its class (:func:`attribute_tasks`):
  ``bright``, whether an image's mean pixel is above the median of the attacker's own images (it
  partly follows the class: pullovers are brighter than sandals); and two *within-class*
  attributes, balanced inside every class by construction, so the class label says nothing about
  them and a probe above chance reads information the designated task does not need:
  ``bright_in_class`` (mean pixel above the median of the attacker's images of the same class)
  and ``area_in_class`` (fraction of pixels above 0.1, the object's extent, above its class median),
  and ``centroid_in_class`` (the intensity-weighted mean row of the image, where the object's mass
  sits vertically, above its class median: the object sits lower in the frame). ``attributes``
  picks which.

Probes are scored on the released features of the first ``eval_limit`` test images.

Two protocols, recorded in the result (``extra["protocol"]``) so they are never confused:

* ``adaptive`` (default): the probes are trained on the *defended* run's released features, as
  described above: the stronger adversary, who retrains on what the defense releases.
* ``frozen`` (``reference=RUN_DIR``, the paper's protocol): the unintended classifiers are trained
  on the released features of an *undefended* reference run (the same target spec opened in that
  run: the same artifact file, its own release transform, the same attacker images), then frozen,
  input standardisation included, and applied to the attacked run's released features. Every task
  except the designated one is unintended. Frozen probes of the designated task are trained too
  and reported apart (``suppression_ratio_same_task`` = designated accuracy / the best of them):
  the paper's own unintended models are other architectures for the designated task; they also
  show how far the released features moved from the reference's (an independently trained
  encoder has another feature basis, and frozen probes fail on it whatever the defense). Each
  probe is also scored on the reference's own released test features (``ref_acc_*``): what the
  undefended model leaks. The reference must be the same model trained on the same data set
  (checked: data set name, input and feature shapes, classes). Its result is saved apart, as
  ``repurpose-TARGET~frozen.json``, and re-used only while the reference run's checkpoint and
  artifacts are unchanged too (``Attack.reference_runs``).

With the attributes on, ``best_within_class_adv`` is the best probe's advantage over chance on any
within-class attribute (``*_in_class``): information the designated task does not need.

Designated accuracy: the accuracy of the *designated* classifier, the run's frozen cloud head on
the released features, when the target exposes it (``Target.head()``); otherwise the best fresh
probe on the designated task. Unintended classifiers: every probe on another task, plus the
fresh probes on the designated task when the designated accuracy is the head's (re-using the
features by *another architecture* is repurposing too, as in the paper).

Suppression ratio (the paper's definition) = designated accuracy / best unintended accuracy.
Raw accuracies mix tasks of different chance levels (a binary task starts at 50% or more), so
the result also reports each probe's *advantage* over chance, (acc - chance) / (1 - chance)
with chance the test set's majority-class rate, and ``suppression_ratio_adv`` = designated
advantage / max(best unintended advantage, 0.01): above 1 means the features serve the
designated task better than any repurposing; the 0.01 floor caps it at 100 when nothing leaks.
``suppression_chance_bound`` = designated accuracy / the highest chance rate of the unintended
tasks: the ratio when every unintended classifier falls to its task's majority rate, so the
ratio exceeds it only where a probe does worse than chance (binary tasks, whose majority rate is
at least 50%, cap it at 2x).

Paper: Guo et al., "Variational Feature Compression for Model-Specific Representations" (arXiv
2604.06644: unintended models trained on clean inputs, applied unchanged to the defended ones; on
CIFAR-100 they fall to < 2%, a suppression ratio > 45); probes follow the linear/MLP probing
practice of Alain & Bengio, 2016.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import ATTACKS, Attack, AttackError, check_positive

__all__ = ["RepurposeConfig", "RepurposeAttack", "PROBES", "ATTRIBUTES", "default_groups",
           "derive_tasks", "attribute_tasks", "suppression", "best_within_class", "build_probe", "ADV_FLOOR"]

PROBES = ("linear", "mlp", "cnn")
ATTRIBUTES = ("bright", "bright_in_class", "area_in_class", "centroid_in_class")
ADV_FLOOR = 0.01
_GROUPS = {
    "fashion-mnist": {"footwear": [5, 7, 9], "upper_body": [0, 2, 4, 6]},
    "mnist": {"odd": [1, 3, 5, 7, 9], "large": [5, 6, 7, 8, 9]},
    "cifar10": {"vehicle": [0, 1, 8, 9]},
}


@dataclass
class RepurposeConfig:
    """Input-repurposing probe settings (see the module docstring)."""

    attack_name: ClassVar[str] = "repurpose"
    probes: list[str] = field(default_factory=lambda: list(PROBES))
    groups: Any = None  # {name: [positive classes]} or "name=1,2;other=3"; None = the data set's defaults
    mappings: Any = None  # {name: [new label of class 0, of class 1, ...]}
    # input-attribute tasks (names from ATTRIBUTES; "bright,area_in_class"; true = all, false = none)
    attributes: list[str] = field(default_factory=lambda: list(ATTRIBUTES))
    reference: str = ""  # an undefended run's directory: the frozen (paper) protocol; "" = adaptive
    n_train: int = 0  # aux images to train on; 0 = the whole aux split
    eval_limit: int = 5000  # test images to score on; 0 = the whole test split
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    hidden: int = 256  # MLP hidden units; the CNN has 32 and 64 channels

    def __post_init__(self):
        if isinstance(self.probes, str):
            self.probes = [p.strip() for p in self.probes.split(",") if p.strip()]
        bad = [p for p in self.probes if p not in PROBES]
        if bad or not self.probes:
            raise AttackError(f"repurpose.probes must be some of {', '.join(PROBES)}, got {self.probes!r}: "
                              "e.g. --set probes=linear,mlp,cnn")
        self.groups = _parse_groups(self.groups)
        self.attributes = _parse_attributes(self.attributes)
        if not isinstance(self.reference, str):
            raise AttackError(f"repurpose.reference must be a run directory, got {self.reference!r}: "
                              "e.g. --set reference=runs/none")
        if self.mappings is not None and not isinstance(self.mappings, dict):
            raise AttackError("repurpose.mappings must map a task name to one label per class, e.g. "
                              "{'coarse': [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]}")
        for name in ("epochs", "batch_size", "hidden"):
            check_positive(self, name, integer=True)
        for name in ("n_train", "eval_limit"):
            check_positive(self, name, integer=True, allow_zero=True)
        check_positive(self, "lr")

    @property
    def protocol(self) -> str:
        """"frozen" (the paper's: probes trained on the reference run) or "adaptive" (retrained)."""
        return "frozen" if self.reference else "adaptive"


def _parse_attributes(value: Any) -> list[str]:
    if isinstance(value, bool):
        return list(ATTRIBUTES) if value else []
    names = [a.strip() for a in value.split(",") if a.strip()] if isinstance(value, str) else list(value)
    bad = [a for a in names if a not in ATTRIBUTES]
    if bad:
        raise AttackError(f"repurpose.attributes must be some of {', '.join(ATTRIBUTES)}, got {bad[0]!r}: "
                          "e.g. --set attributes=bright_in_class,area_in_class")
    return [a for a in ATTRIBUTES if a in names]


def _parse_groups(value: Any) -> dict[str, list[int]] | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        out = {}
        for part in str(value).split(";"):
            if part.strip():
                name, classes = part.split("=")
                out[name.strip()] = [int(c) for c in classes.split(",")]
        return out
    except ValueError:
        raise AttackError(f"repurpose.groups {value!r} is not 'name=classes;...': "
                          "e.g. --set groups='footwear=5,7,9;upper_body=0,2,4,6'") from None


def default_groups(dataset: str, num_classes: int) -> dict[str, list[int]]:
    """Class groupings used as unintended tasks when none are configured."""
    if dataset in _GROUPS:
        return {k: list(v) for k, v in _GROUPS[dataset].items()}
    return {"parity": list(range(1, num_classes, 2)), "upper_half": list(range(num_classes // 2, num_classes))}


def derive_tasks(cfg: RepurposeConfig, dataset: str, num_classes: int) -> dict[str, np.ndarray]:
    """Task name -> class-to-label lookup table (length num_classes); "designated" is the identity."""
    tasks = {"designated": np.arange(num_classes)}
    groups = cfg.groups if (cfg.groups is not None or cfg.mappings is not None) else default_groups(dataset, num_classes)
    for name, pos in (groups or {}).items():
        bad = [c for c in pos if not 0 <= int(c) < num_classes]
        if bad:
            raise AttackError(f"repurpose group '{name}' names classes {bad} outside 0..{num_classes - 1}")
        tasks[name] = np.isin(np.arange(num_classes), pos).astype(np.int64)
    for name, table in (cfg.mappings or {}).items():
        table = np.asarray(table, np.int64)
        if table.shape != (num_classes,) or table.min() < 0:
            raise AttackError(f"repurpose mapping '{name}' needs {num_classes} labels >= 0 (one per class), "
                              f"got {table.tolist()}")
        tasks[name] = np.unique(table, return_inverse=True)[1]
    for name, table in tasks.items():
        if name != "designated" and len(np.unique(table)) < 2:
            raise AttackError(f"repurpose task '{name}' gives every class the same label: it cannot be learned; "
                              "name a proper subset of the classes")
    return tasks


AREA_LEVEL = 0.1  # a pixel above this (of [0, 1]) counts toward an object's area


def _above_median(v_tr: np.ndarray, v_ev: np.ndarray, c_tr: np.ndarray | None = None,
                  c_ev: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary labels v > the median of the attacker's values v_tr, per class when classes are
    given (a class without attacker images falls back to the overall median); also the cut(s)."""
    cut = np.full(1, np.median(v_tr))
    if c_tr is not None:
        cut = np.full(int(max(c_tr.max(), c_ev.max())) + 1, cut[0])
        for c in np.unique(c_tr):
            cut[c] = np.median(v_tr[c_tr == c])
    c_tr, c_ev = (np.zeros(len(v), np.int64) if c is None else c for v, c in ((v_tr, c_tr), (v_ev, c_ev)))
    return (v_tr > cut[c_tr]).astype(np.int64), (v_ev > cut[c_ev]).astype(np.int64), cut


def _centroid_row(x: np.ndarray) -> np.ndarray:
    """Intensity-weighted mean row of each image (N, C, H, W), as a fraction of the height (0 = top);
    an all-black image counts as centred."""
    mass = x.sum(axis=(1, 3))  # (N, H)
    rows = np.linspace(0.0, 1.0, x.shape[2])
    total = mass.sum(axis=1)
    return np.where(total > 0, (mass * rows).sum(axis=1) / np.maximum(total, 1e-12), 0.5)


def attribute_tasks(x_tr: np.ndarray, c_tr: np.ndarray, x_ev: np.ndarray, c_ev: np.ndarray,
                    names: tuple[str, ...] | list[str] = ATTRIBUTES):
    """Input-attribute tasks ``names`` (of ATTRIBUTES) from images in [0, 1] (N, C, H, W) and their
    classes: name -> (train labels, eval labels) and name -> description (see the module
    docstring). Thresholds come from the attacker's images (x_tr) only."""
    bright_tr, bright_ev = x_tr.mean(axis=(1, 2, 3)), x_ev.mean(axis=(1, 2, 3))
    area_tr, area_ev = ((x > AREA_LEVEL).mean(axis=(1, 2, 3)) for x in (x_tr, x_ev))
    cent_tr, cent_ev = _centroid_row(x_tr), _centroid_row(x_ev)
    b_tr, b_ev, cut = _above_median(bright_tr, bright_ev)
    make = {
        "bright": lambda: ((b_tr, b_ev), f"mean pixel > {cut[0]:.4f} (median of the attacker's aux images)"),
        "bright_in_class": lambda: (_above_median(bright_tr, bright_ev, c_tr, c_ev)[:2],
                                    "mean pixel > the median of the attacker's aux images of its class"),
        "area_in_class": lambda: (_above_median(area_tr, area_ev, c_tr, c_ev)[:2],
                                  f"fraction of pixels > {AREA_LEVEL} above the median of the attacker's aux "
                                  "images of its class"),
        "centroid_in_class": lambda: (_above_median(cent_tr, cent_ev, c_tr, c_ev)[:2],
                                      "intensity-weighted mean row (0 = top, 1 = bottom) above the median of the "
                                      "attacker's aux images of its class"),
    }
    labels, desc = {}, {}
    for name in names:
        labels[name], desc[name] = make[name]()
    return labels, desc


# ---------------------------------------------------------------------------------------- probes


def build_probe(kind: str, feature_shape: tuple[int, ...], n_out: int, hidden: int = 256) -> nn.Module:
    d = int(np.prod(feature_shape))
    if kind == "linear":
        return nn.Sequential(nn.Flatten(1), nn.Linear(d, n_out))
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(1), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, n_out))
    c = feature_shape[0]
    return nn.Sequential(nn.Conv2d(c, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Linear(256, n_out))


def _fit_probe(net: nn.Module, z: torch.Tensor, y: torch.Tensor, cfg: RepurposeConfig, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    steps_per_epoch = -(-len(z) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    net.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(z), generator=g)
        for i in range(0, len(z), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(net(z[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def _predict(net, z: torch.Tensor, batch: int = 1000) -> np.ndarray:
    return torch.cat([net(z[i:i + batch]).argmax(1) for i in range(0, len(z), batch)]).numpy()


def _advantage(acc: float, chance: float) -> float:
    return (acc - chance) / (1.0 - chance) if chance < 1 else 0.0


def suppression(designated_acc: float, designated_chance: float,
                unintended: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Suppression ratios from the designated accuracy and {name: (accuracy, chance)} of the
    unintended classifiers (see the module docstring for the definitions)."""
    if not unintended:
        raise AttackError("the suppression ratio needs at least one unintended classifier: add a task "
                          "(--set groups=...) or a probe")
    best = max(unintended, key=lambda k: unintended[k][0])
    best_adv = max(unintended, key=lambda k: _advantage(*unintended[k]))
    adv_d = _advantage(designated_acc, designated_chance)
    adv_u = _advantage(*unintended[best_adv])
    return {"best_unintended": best, "best_unintended_acc": unintended[best][0],
            "suppression_ratio": designated_acc / max(unintended[best][0], 1e-12),
            "suppression_chance_bound": designated_acc / max(max(c for _, c in unintended.values()), 1e-12),
            "best_unintended_adv_name": best_adv, "designated_adv": adv_d, "best_unintended_adv": adv_u,
            "suppression_ratio_adv": adv_d / max(adv_u, ADV_FLOOR)}


def best_within_class(acc: dict[tuple[str, str], float], chance: dict[str, float]) -> tuple[str | None, float | None]:
    """("task/probe", advantage over chance) of the best probe on a within-class attribute
    (a ``*_in_class`` task), or (None, None) when there is none."""
    within = {f"{t}/{p}": _advantage(a, chance[t]) for (t, p), a in acc.items() if t.endswith("_in_class")}
    if not within:
        return None, None
    name = max(within, key=within.get)
    return name, within[name]


# ---------------------------------------------------------------------------------------- attack


class RepurposeAttack(Attack):
    """Input repurposing: fresh classifiers on released features, for the designated and other tasks."""

    name = "repurpose"
    family = "repurposing"
    requires = frozenset({"features"})
    config_cls = RepurposeConfig
    alternative = None
    presets = {"quick": {"n_train": 1000, "eval_limit": 500, "epochs": 5, "probes": ["linear", "mlp"]}}

    def variant(self) -> str:
        """"frozen" for the paper's protocol (``reference`` set): a result of its own beside the adaptive one."""
        return "" if self.config.protocol == "adaptive" else self.config.protocol

    def reference_runs(self) -> dict[str, str]:
        """The frozen protocol depends on the reference run too (its probes are trained there)."""
        return {"reference": self.config.reference} if self.config.reference else {}

    def _run(self, target, data, seed, say):
        cfg = self.config
        timings: dict[str, float] = {}
        tasks = derive_tasks(cfg, data.name, data.num_classes)
        n_train = min(cfg.n_train or len(data.aux), len(data.aux))
        n_eval = min(cfg.eval_limit or len(data.test), len(data.test))
        x_tr, c_tr = data.aux.floats(slice(0, n_train)), data.aux.labels[:n_train]
        x_ev, c_ev = data.test.floats(slice(0, n_eval)), data.test.labels[:n_eval]
        head = target.head()
        reference = _open_reference(cfg.reference, target, data) if cfg.reference else None
        if reference is not None and head is None:
            raise AttackError(f"the frozen protocol scores the designated task with the run's cloud head; target "
                              f"'{target.name}' exposes none: attack an artifact or torch target of a run")

        t0 = time.perf_counter()
        say(f"repurpose ({cfg.protocol}): released features of {n_train} aux and {n_eval} test images from "
            f"{target.name}" + (f"; probes trained on those of {cfg.reference}" if reference is not None else ""))
        z_ev = target.features(x_ev, release=True, seed=seed * 1000 + 2)
        if reference is None:
            z_fit = target.features(x_tr, release=True, seed=seed * 1000 + 1)
            z_ref_ev = None
        else:
            z_fit = reference.features(x_tr, release=True, seed=seed * 1000 + 3)
            z_ref_ev = reference.features(x_ev, release=True, seed=seed * 1000 + 4)
        timings["features_s"] = round(time.perf_counter() - t0, 3)
        labels = {k: (t[c_tr], t[c_ev]) for k, t in tasks.items()}
        attr, attr_desc = attribute_tasks(x_tr, c_tr, x_ev, c_ev, cfg.attributes)
        labels.update(attr)

        # standardisation is part of a probe: fitted on its training features, frozen with it
        mu, sd = z_fit.mean(axis=0, keepdims=True), z_fit.std(axis=0, keepdims=True) + 1e-6
        zt_fit, zt_ev = (torch.from_numpy((z - mu) / sd) for z in (z_fit, z_ev))
        zt_ref_ev = None if z_ref_ev is None else torch.from_numpy((z_ref_ev - mu) / sd)
        probes = [p for p in cfg.probes if p != "cnn" or z_fit.ndim == 4]
        notes = [] if probes == list(cfg.probes) else ["cnn probe skipped: the released features are not a 2-D map"]

        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        chance: dict[str, float] = {}
        acc: dict[tuple[str, str], float] = {}
        for task, (y_tr, y_ev) in labels.items():
            k = int(max(y_tr.max(), y_ev.max())) + 1
            chance[task] = float(np.bincount(y_ev, minlength=k).max() / len(y_ev))
            metrics[f"chance_{task}"] = chance[task]
            for i, kind in enumerate(probes):
                with torch.random.fork_rng():
                    torch.manual_seed(seed * 100 + i)
                    net = build_probe(kind, z_fit.shape[1:], k, cfg.hidden)
                net = _fit_probe(net, zt_fit, torch.from_numpy(y_tr), cfg, seed)
                acc[(task, kind)] = float((_predict(net, zt_ev) == y_ev).mean())
                metrics[f"acc_{task}_{kind}"] = acc[(task, kind)]
                line = f"repurpose: {kind} probe on '{task}': {acc[(task, kind)]:.4f}"
                if zt_ref_ev is not None:
                    metrics[f"ref_acc_{task}_{kind}"] = float((_predict(net, zt_ref_ev) == y_ev).mean())
                    line += f" (frozen; {metrics[f'ref_acc_{task}_{kind}']:.4f} on the reference's features)"
                say(f"{line} (chance {chance[task]:.4f})")
        timings["probes_s"] = round(time.perf_counter() - t0, 3)

        if head is not None:
            with torch.no_grad():
                zh = torch.from_numpy(np.ascontiguousarray(z_ev, np.float32))
                pred = torch.cat([head(zh[i:i + 1000]).argmax(1) for i in range(0, len(zh), 1000)]).numpy()
            designated, source = float((pred == c_ev).mean()), "the run's frozen cloud head on the released features"
        else:
            best = max(probes, key=lambda p: acc[("designated", p)])
            designated, source = acc[("designated", best)], f"the best fresh probe ({best}) on the designated task"
        # adaptive with the head: a fresh probe on the designated task is another architecture re-using the
        # features, unintended too; frozen: the paper's unintended classifiers are those of the other tasks
        own = head is not None and reference is None
        unintended = {f"{t}/{p}": (a, chance[t]) for (t, p), a in acc.items() if own or t != "designated"}
        s = suppression(designated, chance["designated"], unintended)
        metrics.update({"designated_acc": designated, "best_unintended_acc": s["best_unintended_acc"],
                        "suppression_ratio": s["suppression_ratio"], "designated_adv": s["designated_adv"],
                        "best_unintended_adv": s["best_unintended_adv"],
                        "suppression_ratio_adv": s["suppression_ratio_adv"],
                        "suppression_chance_bound": s["suppression_chance_bound"]})
        within_name, within_adv = best_within_class(acc, chance)
        if within_adv is not None:
            metrics["best_within_class_adv"] = within_adv
        extra = {"protocol": cfg.protocol, "designated_source": source, "best_unintended": s["best_unintended"],
                 "best_unintended_adv_name": s["best_unintended_adv_name"], "best_within_class": within_name,
                 "probes": probes, "tasks": {k: v.tolist() for k, v in tasks.items()}, "n_train": n_train,
                 "evaluation_images": n_eval, "notes": notes + [
                     "suppression_ratio = designated accuracy / best unintended accuracy; suppression_ratio_adv "
                     f"uses accuracy above chance, (acc - chance) / (1 - chance), floored at {ADV_FLOOR}"]}
        extra["tasks"].update(attr_desc)
        if reference is None:
            extra["notes"].append("adaptive protocol: the probes were trained on this run's released features")
        else:
            ref_unintended = {k: metrics[f"ref_acc_{k.replace('/', '_')}"] for k in unintended}
            best_ref = max(ref_unintended, key=ref_unintended.get)
            metrics["ref_best_unintended_acc"] = ref_unintended[best_ref]
            same = max(acc[("designated", p)] for p in probes)
            metrics["suppression_ratio_same_task"] = designated / max(same, 1e-12)
            extra.update({"reference": cfg.reference, "ref_best_unintended": best_ref})
            extra["notes"].append(
                f"frozen protocol: the probes were trained on the released features of {cfg.reference} "
                "(undefended reference) and applied unchanged to this run's; acc_designated_* are frozen "
                "probes of the designated task, counted apart (suppression_ratio_same_task), not as unintended")
        return self.result(target, seed, metrics, timings=timings, extra=extra)


def _open_reference(run_dir: str, target, data):
    """The reference run's target of the same spec as ``target`` (its artifact file, or its torch
    encoder), checked to take the same images and release features of the same shape."""
    from pathlib import Path

    from .targets import open_target

    if not Path(run_dir, "config.toml").is_file():
        raise AttackError(f"repurpose.reference {run_dir!r} is not a run directory (no config.toml): name the "
                          "undefended run, e.g. --set reference=runs/none")
    if target.name.startswith("service:"):
        raise AttackError(f"the frozen protocol needs released features; '{target.name}' is a service")
    threads = getattr(getattr(target, "runtime", None), "threads", None)
    ref = open_target(run_dir, target.name, threads=threads)
    for what, a, b in (("data set", _dataset_name(ref), data.name),
                       ("input shape", ref.input_shape, target.input_shape),
                       ("feature shape", ref.feature_shape, target.feature_shape),
                       ("number of classes", ref.num_classes, data.num_classes)):
        if a is not None and b is not None and a != b:
            raise AttackError(f"reference {run_dir} has {what} {a}, the attacked run {b}: frozen probes need the "
                              "same model on the same data set (train the reference with the same model and data)")
    return ref


def _dataset_name(target) -> str | None:
    """The data set a target's run was trained on (its manifest's, or its torch run's), if known."""
    runtime, run = getattr(target, "runtime", None), getattr(target, "run", None)
    if runtime is not None:
        return runtime.manifest.get("dataset", {}).get("name")
    return None if run is None else run.data.name


ATTACKS.register(help="input repurposing: fresh probes on released features, suppression ratio")(
    RepurposeAttack)
