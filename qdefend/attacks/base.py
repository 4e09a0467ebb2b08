"""The attack contract: declared requirements, a validated config, one verb (``run``), one result.

Every attack (inversion, extraction, repurposing) is a subclass of :class:`Attack` registered in
:data:`ATTACKS` by name. As in the Adversarial Robustness Toolbox, an attack *declares* what it
needs from its target (``requires``: a subset of :data:`CAPABILITIES`) and refuses a target that
cannot give it before doing any work, naming the attack to use instead (``alternative``)::

    attack 'rmle' needs gradients; target 'encoder.int8.tflite' (litert) offers features.
    Use --attack clone_rmle (extract then invert) instead.

Configs are dataclasses validated in ``__post_init__`` whose errors show the corrected setting;
``presets`` hold named overrides (``quick`` for tests and smoke runs). Results are
:class:`AttackResult` objects whose ``to_json()`` is what ``runs/NAME/attacks/*.json`` holds.
"""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from qdefend import checks
from qdefend.errors import QdefendError
from qdefend.plainjson import plain
from qdefend.registry import Registry

__all__ = [
    "CAPABILITIES", "AttackError", "AttackResult", "Attack", "ATTACKS", "build_attack",
    "check_positive", "check_range", "check_choice",
]

CAPABILITIES = ("features", "gradients", "probabilities", "labels")
RESULT_VERSION = 1


class AttackError(QdefendError):
    """An attack cannot run as asked (wrong target, bad parameter); the message says what to do."""


# ---------------------------------------------------------------------------------------- configs


# An attack config's fields are set with `qdefend attack --set NAME=VALUE`, so the fix names the bare
# field; the checks themselves are qdefend.checks'.


def check_positive(cfg: Any, name: str, *, integer: bool = False, allow_zero: bool = False, example: Any = None):
    """AttackError unless ``cfg.name`` is a positive (``allow_zero``: non-negative) number."""
    ex = example if example is not None else _default(cfg, name)
    setattr(cfg, name, checks.check_number(getattr(cfg, name), f"{_where(cfg)}.{name}", lo=0, lo_open=not allow_zero,
                                           integer=integer, fix=f"--set {name}={ex}", error=AttackError))


def check_range(cfg: Any, name: str, lo: float, hi: float, example: Any):
    """AttackError unless ``cfg.name`` is a number in [lo, hi]."""
    checks.check_number(getattr(cfg, name), f"{_where(cfg)}.{name}", lo=lo, hi=hi, fix=f"--set {name}={example}",
                        error=AttackError)


def check_choice(cfg: Any, name: str, choices: tuple[str, ...]):
    """AttackError unless ``cfg.name`` is one of ``choices``."""
    checks.check_choice(getattr(cfg, name), f"{_where(cfg)}.{name}", choices, fix=f"--set {name}={choices[0]}",
                        error=AttackError)


def _where(cfg: Any) -> str:
    return getattr(cfg, "attack_name", None) or type(cfg).__name__


def _default(cfg: Any, name: str) -> Any:
    for f in dataclasses.fields(cfg):
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    return 1


# ---------------------------------------------------------------------------------------- results


@dataclass
class AttackResult:
    """What one attack on one target produced.

    metrics: numbers for the report (floats; e.g. mse, psnr, ssim, baseline_mse, leak_ratio).
    originals / reconstructions: (N, C, H, W) float32 [0,1] images for the PNG grid (inversion
    attacks only; never written to JSON). extra: JSON-ready details (per-image values, notes,
    curves). ``notes`` in extra is a list of sentences the report must print with the numbers
    (e.g. "attacked through the fake-quant twin").
    """

    attack: str
    target: str
    metrics: dict[str, float]
    config: dict[str, Any]
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    originals: np.ndarray | None = None
    reconstructions: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def notes(self) -> list[str]:
        return list(self.extra.get("notes", []))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (no arrays); ``json.dumps`` works on it as is."""
        return plain({
            "version": RESULT_VERSION, "attack": self.attack, "target": self.target,
            "metrics": self.metrics, "config": self.config, "seed": self.seed,
            "timings": self.timings, "extra": self.extra,
            "n_images": None if self.reconstructions is None else int(len(self.reconstructions)),
        })

    def save(self, path: str | Path, *, images: bool = True) -> Path:
        """Write ``path`` (.json) and, when there are images and ``images``, ``path`` with .npz
        (originals and reconstructions, loadable with ``np.load(..., allow_pickle=False)``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
        if images and self.reconstructions is not None:
            arrays = {"reconstructions": np.asarray(self.reconstructions, np.float32)}
            if self.originals is not None:
                arrays["originals"] = np.asarray(self.originals, np.float32)
            np.savez_compressed(path.with_suffix(".npz"), **arrays)
        return path


    @classmethod
    def load(cls, path: str | Path) -> "AttackResult":
        """Read back what :meth:`save` wrote (the JSON, and the images when the .npz is there)."""
        import zipfile

        path = Path(path)
        try:
            d = json.loads(path.read_text())
            arrays: dict[str, np.ndarray] = {}
            npz = path.with_suffix(".npz")
            if npz.is_file():
                with np.load(npz, allow_pickle=False) as f:
                    arrays = {k: f[k] for k in f.files}
            return cls(attack=d["attack"], target=d["target"], metrics=d["metrics"], config=d["config"],
                       seed=d["seed"], timings=d.get("timings", {}), originals=arrays.get("originals"),
                       reconstructions=arrays.get("reconstructions"), extra=d.get("extra", {}))
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise QdefendError(f"{path} is not a readable attack result ({type(e).__name__}): delete it "
                               "(and its .npz) and run the attack again") from None


# ---------------------------------------------------------------------------------------- attacks


class Attack:
    """Base class. Subclasses set ``name``, ``requires``, ``config_cls``, ``alternative`` and
    ``presets``, and implement ``_run(target, data, seed, progress) -> AttackResult``.

    ``data`` is the run's :class:`qdefend.data.SplitData`: attacks train on ``data.aux`` (the
    attacker's split, disjoint from the victim's train/val) and evaluate on ``data.test``.
    """

    name: ClassVar[str] = "attack"
    family: ClassVar[str] = ""  # "inversion" | "extraction" | "repurposing"
    requires: ClassVar[frozenset[str]] = frozenset()
    config_cls: ClassVar[type] = type("NoConfig", (), {})
    alternative: ClassVar[str | None] = None  # e.g. "clone_rmle (extract then invert)"
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, config: Any = None, **overrides: Any):
        if config is None:
            config = self._make_config(overrides)
        elif overrides:
            config = self._make_config({**_asdict(config), **overrides})
        elif not isinstance(config, self.config_cls):
            raise AttackError(f"attack '{self.name}' takes a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config

    @classmethod
    def _make_config(cls, params: dict[str, Any]) -> Any:
        fields = {f.name for f in dataclasses.fields(cls.config_cls)} if dataclasses.is_dataclass(cls.config_cls) else set()
        # `--set attacker.aux_size=N` names the attacker-data fields (qdefend.attacks.attacker) by section
        params = {k[len("attacker."):] if k.startswith("attacker.") and k[len("attacker."):] in fields else k: v
                  for k, v in params.items()}
        unknown = sorted(set(params) - fields)
        if unknown:
            valid = ", ".join(sorted(fields)) or "(none)"
            raise AttackError(f"attack '{cls.name}' has no parameter '{unknown[0]}'. Valid parameters: {valid}")
        if fields:
            from qdefend.config import check_value

            hints = typing.get_type_hints(cls.config_cls)
            params = {k: check_value(v, hints[k], f"{cls.name}.{k}", parsed_lists=True) for k, v in params.items()}
        return cls.config_cls(**params)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "Attack":
        """The attack with a named preset (e.g. "quick") applied, then ``overrides``."""
        if preset in (None, "default"):
            return cls(**overrides)
        if preset not in cls.presets:
            valid = ", ".join(["default", *sorted(cls.presets)])
            raise AttackError(f"attack '{cls.name}' has no preset '{preset}'. Valid presets: {valid}")
        return cls(**{**cls.presets[preset], **overrides})

    def config_dict(self) -> dict[str, Any]:
        return _asdict(self.config)

    def variant(self) -> str:
        """"" for the attack's default protocol; otherwise a short tag (e.g. "pool-mnist5k",
        "frozen") naming another protocol, whose result is kept in a file of its own
        (``ATTACK-TARGET~VARIANT.json``) instead of overwriting the default one."""
        return ""

    def reference_runs(self) -> dict[str, str]:
        """Other run directories the result depends on (name -> path; e.g. the undefended run whose
        features frozen probes were trained on): a saved result stands only while their checkpoints
        and artifacts are unchanged too. Empty by default."""
        return {}

    # -------------------------------------------------------------------- requirements

    def missing(self, target: Any) -> list[str]:
        """The required capabilities ``target`` does not offer (empty when it can be attacked)."""
        return [c for c in CAPABILITIES if c in self.requires and c not in target.offers]

    def check(self, target: Any) -> None:
        """Refuse a target that cannot give what this attack needs, naming what to use instead."""
        lost = self.missing(target)
        if lost:
            offers = ", ".join(c for c in CAPABILITIES if c in target.offers) or "nothing"
            alt = f" Use --attack {self.alternative} instead." if self.alternative else ""
            raise AttackError(
                f"attack '{self.name}' needs {' and '.join(lost)}; target '{target.name}' ({target.kind}) "
                f"offers {offers}.{alt}"
            )

    # -------------------------------------------------------------------- the verb

    def run(self, target: Any, data: Any, *, seed: int = 0,
            progress: Callable[[str], None] | None = None) -> AttackResult:
        """Check the target, then attack it with ``data`` (a SplitData); seeded and timed."""
        self.check(target)
        import torch

        torch.manual_seed(seed)
        say = progress or (lambda msg: None)
        t0 = time.perf_counter()
        result = self._run(target, data, seed, say)
        result.timings.setdefault("total_s", round(time.perf_counter() - t0, 3))
        notes = list(result.extra.get("notes", []))
        for n in getattr(target, "notes", []):
            if n not in notes:
                notes.append(n)
        if notes:
            result.extra["notes"] = notes
        return result

    def _run(self, target: Any, data: Any, seed: int, say: Callable[[str], None]) -> AttackResult:
        raise NotImplementedError

    def result(self, target: Any, seed: int, metrics: dict[str, float], **kw: Any) -> AttackResult:
        """An AttackResult for this attack, config and target."""
        return AttackResult(attack=self.name, target=target.name, metrics=dict(metrics),
                            config=self.config_dict(), seed=seed, **kw)


def _asdict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}


ATTACKS: Registry[type[Attack]] = Registry("attack")


def build_attack(name: str, preset: str | None = None, **params: Any) -> Attack:
    """``build_attack("decoder", epochs=20)`` or ``build_attack("rmle", preset="quick")``."""
    cls = ATTACKS.get(name)
    return cls.from_preset(preset, **params) if preset else cls(**params)
