"""Run configuration: one dataclass per component, composed into :class:`RunConfig`.

A run's resolved config (every default written out) is saved as ``runs/NAME/config.toml`` and is
the single source of truth when the run is resumed, exported or attacked.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import check_choice, check_number, fix_hint
from .data import DataConfig
from .errors import QdefendError
from .models import ModelConfig
from .quant import QuantConfig

CONFIG_VERSION = 1


FREEZE = ("none", "encoder", "head", "network")


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults reach >= 87% int8 accuracy on Fashion-MNIST in 2 epochs."""

    epochs: int = 2
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | none (stepped once per batch for cosine)
    milestones: list[int] = field(default_factory=list)  # epochs, for schedule = "step"
    gamma: float = 0.2
    seed: int = 0
    device: str = "cpu"  # cpu | cuda
    num_threads: int = 0  # 0 = torch's default
    eval_batch_size: int = 512
    keep_checkpoints: int = 2  # epoch checkpoints kept besides the best one
    channels_last: bool = True  # NHWC activations in training: ~18% faster convs on CPU (mkldnn)
    freeze: str = "none"  # none | encoder | head | network: parts kept fixed (eval mode, no step); needs --from
    max_loss: float | None = None  # a batch's task loss above this is divergence (unset: 25 x ln(classes))
    # the checkpoint exported and attacked ("best"): best_val = the best validation accuracy among the
    # epochs the defense shaped; last = the last epoch (a defense that trades accuracy for privacy as it
    # trains, e.g. a CEM fine-tune, would otherwise ship its least-defended epoch)
    select: str = "best_val"
    nproc: int = 1  # processes that trained it (qdefend train --nproc N, recorded); batch_size stays the global batch

    def __post_init__(self):
        check_number(self.epochs, "train.epochs", lo=1, integer=True, fix="--epochs 2")
        check_number(self.batch_size, "train.batch_size", lo=1, integer=True, example=128)
        check_number(self.lr, "train.lr", lo=0, lo_open=True, example=0.05)
        for key in ("momentum", "weight_decay", "gamma"):
            check_number(getattr(self, key), f"train.{key}", lo=0, example=0)
        check_number(self.num_threads, "train.num_threads (0: torch's default)", lo=0, integer=True, fix="--threads 2")
        check_number(self.nproc, "train.nproc (recorded by qdefend train --nproc)", lo=1, integer=True, fix="--nproc 2")
        check_number(self.eval_batch_size, "train.eval_batch_size", lo=1, integer=True, example=512)
        check_number(self.keep_checkpoints, "train.keep_checkpoints", lo=1, integer=True, example=2)
        for m in self.milestones:
            check_number(m, "train.milestones (epochs)", lo=1, integer=True, fix="--set train.milestones=[10,20]")
        if self.max_loss is not None:
            check_number(self.max_loss, "train.max_loss (or unset for the automatic rule)", lo=0, lo_open=True,
                         fix="--set train.max_loss=50")
        check_choice(self.optimizer, "train.optimizer", ("sgd", "adam"))
        check_choice(self.select, "train.select", ("best_val", "last"))
        check_choice(self.schedule, "train.schedule", ("cosine", "step", "none"))
        check_choice(self.device, "train.device", ("cpu", "cuda"))
        check_choice(self.freeze, "train.freeze", FREEZE,
                     fix="--set train.freeze=network (to train only a defense's own parameters, with --from)")


@dataclass
class DefenseConfig:
    """A composition of defenses, e.g. ``stack = "noise+nopeek"``, with per-defense parameters.

    ``params`` maps a defense name to its config fields, e.g. ``{"noise": {"sigma": 0.1}}``.
    """

    stack: str = "none"
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class RunConfig:
    """Everything a run needs; saved resolved as config.toml."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    init_from: str | None = None  # a run directory whose weights initialise this one (--from)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return from_dict(cls, d)

    def save(self, path: Path) -> None:
        import tomli_w

        _atomic_write_text(Path(path), tomli_w.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise QdefendError(f"no config at {path}: is this a run directory made by `qdefend train`?")
        return cls.from_dict(read_toml(path, str(path)))


def from_dict(cls, d: dict[str, Any], where: str = ""):
    """Build dataclass ``cls`` from a dict, recursing into nested dataclasses.

    Unknown keys are refused with the list of valid ones, so a typo in a config file never passes
    silently.
    """
    if not isinstance(d, dict):
        raise QdefendError(f"config section '{where or cls.__name__}' must be a table, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise QdefendError(
            f"unknown config key {where + '.' if where else ''}{unknown[0]}. "
            f"Valid keys{' of [' + where + ']' if where else ''}: {', '.join(sorted(names))}"
        )
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            v = from_dict(t, v, f"{where}.{k}" if where else k)
        kwargs[k] = check_value(v, t, f"{where}.{k}" if where else k, example=defaults.get(k))
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise QdefendError(f"bad config section '{where or cls.__name__}': {e}") from None


def check_value(v: Any, t: Any, key: str, *, parsed_lists: bool = False, example: Any = None) -> Any:
    """Type-check (and lightly coerce: int -> float) a value that arrives from the command line or
    TOML. Floats must be finite: TOML spells ``nan`` and ``inf``, and ``lr <= 0`` is False for NaN,
    so a range check alone would let them through. Lists and tables are checked element-wise;
    with ``parsed_lists`` a list field also takes what its config parses itself (``"1000,5000"``)."""
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if t is Any:
        return v
    if origin in (typing.Union, types.UnionType):
        if v is None:
            return None
        non_none = [a for a in args if a is not type(None)]
        return check_value(v, non_none[0], key, parsed_lists=parsed_lists, example=example) if len(non_none) == 1 else v
    if origin is list:
        if parsed_lists and not isinstance(v, list):
            return v
        if not isinstance(v, list):
            raise QdefendError(f"config key {key} must be a list such as [2, 4], got {v!r}")
        return [check_value(e, args[0], f"{key}[{i}]") for i, e in enumerate(v)] if args else v
    if origin is dict:
        if not isinstance(v, dict):
            raise QdefendError(f"config key {key} must be a table such as {{ a = 1 }}, got {v!r}")
        return {k: check_value(e, args[1], f"{key}.{k}") for k, e in v.items()} if args else v
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if t in (int, float, str, bool) and (not isinstance(v, t) or (t is int and isinstance(v, bool))):
        raise QdefendError(f"config key {key} must be {t.__name__}, got {v!r}{fix_hint(key, example)}")
    if t is float and not math.isfinite(v):
        raise QdefendError(f"config key {key} must be a finite number, got {v!r}{fix_hint(key, example)}")
    return v


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict, or a one-line error naming ``what`` (e.g. '--config x.toml')."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise QdefendError(f"{what} is not a text file (not UTF-8): pass a TOML config such as a run's config.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise QdefendError(f"{what} is not valid TOML ({e}): fix or replace it") from None
    except IsADirectoryError:
        raise QdefendError(f"{what} is a folder: pass a TOML file") from None


def parse_value(raw: str) -> Any:
    """A value typed on the command line: TOML (``0.01``, ``true``, ``[10, 20]``, ``"x"``), else the
    bare string (``fast``, ``1000,5000``)."""
    try:
        return tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return raw.strip()


def parse_assignment(item: str, flag: str = "--set", example: str = "train.lr=0.01",
                     form: str = "KEY=VALUE", error: type[QdefendError] = QdefendError) -> tuple[str, Any]:
    """``"KEY=VALUE"`` -> ``(KEY, parse_value(VALUE))``: the one KEY=VALUE parser of the command
    line (``--set`` of train and attack, ``--preset``, service-output arguments)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise error(f"{flag} expects {form}, got {item!r}: e.g. {flag} {example}")
    return key.strip(), parse_value(raw)


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set section.key=value`` overrides to a config dict (values parsed as TOML)."""
    for item in overrides:
        key, value = parse_assignment(item)
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise QdefendError(f"--set {key}: '{p}' is not a config section")
        node[parts[-1]] = value
    return d


# What a resume may change: how the optimisation continues and where it runs. Everything else (data,
# model, quantization, defenses, batch size, seed) makes another run, so a resume refuses it.
RESUMABLE = tuple(f"train.{k}" for k in (
    "epochs", "lr", "momentum", "weight_decay", "schedule", "milestones", "gamma", "device", "num_threads",
    "eval_batch_size", "keep_checkpoints", "max_loss", "nproc"))


def flat_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}`` (empty tables kept as values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_config(cfg: RunConfig, overrides: list[str], flags: dict[str, Any] | None = None
                  ) -> tuple[RunConfig, dict[str, list]]:
    """``cfg`` (a run's config.toml) with the command-line ``flags`` (``{"train.epochs": 4}``, None
    = not given) and ``--set`` ``overrides`` a resume may apply, and what changed as
    ``{key: [old, new]}``; a key outside :data:`RESUMABLE` is refused with a message."""
    before = cfg.to_dict()
    d = cfg.to_dict()
    for key, value in (flags or {}).items():
        if value is not None:
            section, name = key.split(".", 1)
            d.setdefault(section, {})[name] = value
    new = RunConfig.from_dict(apply_overrides(d, overrides))
    a, b = flat_keys(before), flat_keys(new.to_dict())
    changed = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        raise QdefendError(
            f"--resume cannot change {refused[0]} (it would make another run): drop that --set, or train a new run "
            f"with another --out. A resume may change {', '.join(RESUMABLE)}")
    return new, changed


def _drop_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_none(v) for v in x]
    return x


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
