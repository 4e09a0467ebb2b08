"""Train / export / attack unless already done: the one rule for re-using what a run directory holds.

``qdefend demo``, ``qdefend compare``, ``qdefend partition`` and the benchmarks all go through
these three functions, so they agree on when a stage's output on disk still stands:

* :func:`ensure_trained`: a run is done when its metrics hold the final ``test`` event and a
  checkpoint exists; it is resumed when only a checkpoint exists. A run directory holding another
  config than the one asked for is refused (keys that only say how to run, such as the thread
  count, do not count), never silently re-used or overwritten.
* :func:`ensure_exported`: artifacts are re-used when the manifest validates, lists every artifact
  asked for and each file's sha256 matches; otherwise the run is exported again.
* :func:`ensure_attacked`: a saved attack result is re-used when it was made with the same attack
  config, preset and seed against the same checkpoint and artifacts (their sha256,
  :func:`qdefend.attacks.runner.saved_result`); otherwise the attack runs again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .checkpoint import has_checkpoint
from .config import RunConfig, flat_keys
from .errors import QdefendError
from .run import RunPaths, load_run
from .defenses import build_defense, resolved_params
from .edge.errors import ArtifactError
from .edge.manifest import load_manifest, verify_artifact
from .export import export_run
from .attacks.runner import attack_run, saved_result

__all__ = ["ensure_trained", "ensure_exported", "ensure_attacked", "ensure_attacks", "Trained", "config_difference",
           "HOW_TO_RUN"]

# config keys that say how a run is executed, not what it computes: they may differ on re-use
HOW_TO_RUN = ("train.num_threads", "train.device", "train.eval_batch_size", "train.keep_checkpoints")

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _resolved(cfg: RunConfig) -> dict[str, Any]:
    """The config as the trainer saves it: every defense parameter filled in with its default."""

    d = cfg.to_dict()
    d["defense"]["params"] = resolved_params(build_defense(cfg.defense))
    return d


def config_difference(saved: RunConfig, want: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, wanted)}`` for every config key that differs (defense parameters compared
    with their defaults filled in), how-to-run keys left out."""
    a, b = flat_keys(_resolved(saved)), flat_keys(_resolved(want))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in HOW_TO_RUN and a.get(k) != b.get(k)}


@dataclass
class Trained:
    """What :func:`ensure_trained` found or made."""

    root: Path
    test: dict[str, Any]  # the run's final ``test`` metrics event
    reused: bool  # True: the run was already finished
    resumed: bool  # True: training continued from a checkpoint


def _test_event(paths: RunPaths) -> dict[str, Any] | None:
    done = [r for r in paths.read_metrics() if r.get("event") == "test"]
    return done[-1] if done and has_checkpoint(paths.checkpoints) else None


def ensure_trained(root: str | Path, cfg: RunConfig | dict | None = None, *, say: Say = _quiet,
                   threads: int | None = None, make_trainer: Callable[..., Any] | None = None,
                   console: Any = None, progress: bool = False) -> Trained:
    """Train the run at ``root`` with ``cfg`` (a RunConfig or its dict), finish it from its last
    checkpoint, or re-use it. ``threads``: torch CPU threads for this training (not part of what
    the run computes, so it may differ from the saved run's).

    ``cfg`` None re-uses (or resumes) whatever config the run directory holds and needs one there.
    ``make_trainer(cfg, root, resume=..., console=..., progress=...)`` builds the trainer
    (default :class:`qdefend.train.Trainer`); the run's own config.toml is what a resume trains.
    """
    paths = RunPaths(root)
    if isinstance(cfg, dict):
        cfg = RunConfig.from_dict(cfg)
    saved = RunConfig.load(paths.config) if paths.config.is_file() else None
    if saved is not None and cfg is not None:
        diff = config_difference(saved, cfg)
        if diff:
            key, (old, new) = next(iter(diff.items()))
            more = f" (and {len(diff) - 1} more key(s))" if len(diff) > 1 else ""
            raise QdefendError(f"{paths.root} holds a run with other settings: {key} is {old!r} there, "
                               f"{new!r} here{more}; delete {paths.root} or pass another output directory")
    if saved is None and cfg is None:
        raise QdefendError(f"{paths.root} holds no run (no config.toml): train one with `qdefend train --out {paths.root}`")
    test = _test_event(paths)
    if test is not None:
        say(f"train: done already, skipped ({paths.root} holds the finished run)")
        return Trained(paths.root, test, reused=True, resumed=False)
    resume = saved is not None and has_checkpoint(paths.checkpoints)
    if make_trainer is None:
        from .train import Trainer

        def make_trainer(c, r, *, resume, console, progress):
            return Trainer(c, r, console=console, progress=progress)

    run_cfg = saved if resume else cfg if cfg is not None else saved
    if threads:
        run_cfg.train.num_threads = threads
    say(f"train: {'resuming ' if resume else ''}{paths.root} ({run_cfg.train.epochs} epoch(s))")
    t0 = time.perf_counter()
    rec = make_trainer(run_cfg, paths.root, resume=resume, console=console, progress=progress).fit(resume=resume)
    say(f"train: done in {time.perf_counter() - t0:.0f} s")
    return Trained(paths.root, rec, reused=False, resumed=resume)


def ensure_exported(root: str | Path, artifacts: list[str] | None = None, *, say: Say = _quiet,
                    **export_kw: Any) -> dict:
    """The run's manifest, exporting the run unless every artifact in ``artifacts`` (default: all
    the manifest lists) is there intact (sha256). ``export_kw`` go to
    :func:`qdefend.export.export_run` (formats, calibrate, verify_images, progress)."""

    root = Path(root)
    try:
        m = load_manifest(root)
        names = list(artifacts) if artifacts is not None else list(m["artifacts"])
        for name in names:
            verify_artifact(root, m, name)
        if m.get("verification", {}).get("status") == "verified":  # not an export cut off before it
            say(f"export: done already, skipped ({', '.join(names)} intact in {root})")
            return m
    except ArtifactError:
        pass

    if artifacts is not None and "formats" not in export_kw:
        export_kw["formats"] = tuple(dict.fromkeys(a.rsplit(".", 1)[-1] for a in artifacts))
    say(f"export: {root}")
    return export_run(root, **export_kw)


def _target_name(artifact: str, service_output: str | None) -> str:
    """How progress lines name an attack's target: ``encoder.int8.tflite@round:2`` behind an output defense."""
    return artifact + (f"@{service_output}" if service_output else "")


def ensure_attacked(root: str | Path, artifact: str, attack: str, *, preset: str | None = None,
                    params: dict[str, Any] | None = None, seed: int = 0, run: Any = None,
                    threads: int | None = None, force: bool = False, say: Say = _quiet,
                    progress: Say | None = None, service_output: str | None = None) -> tuple[Any, Path, bool]:
    """``(result, path, reused)`` of ``attack`` on ``artifact`` of the run at ``root`` (behind the
    service-side output defense ``service_output``, e.g. "round:2"): the saved result when it still
    stands (see the module docstring), else a fresh run of the attack."""

    where = _target_name(artifact, service_output)
    if not force:
        path, saved = saved_result(root, artifact, attack, preset=preset, params=params, seed=seed,
                                   service_output=service_output)
        if saved is not None:
            say(f"{attack} on {where}: done already, skipped (re-using {path})")
            return saved, path, True
    say(f"{attack} on {where} (preset {preset or 'default'})")
    res, path = attack_run(root, artifact, attack, preset=preset, params=params, seed=seed, run=run,
                           threads=threads, progress=progress, service_output=service_output)
    return res, path, False


def ensure_attacks(root: str | Path, artifact: str, attacks: Iterable[str], *, preset: str | None = None,
                   params: dict[str, dict] | None = None, seed: int = 0, threads: int | None = None,
                   say: Say = _quiet, run_holder: dict | None = None,
                   service_output: str | None = None) -> dict[str, dict]:
    """:func:`ensure_attacked` for several attacks on one target: their results as JSON dicts by
    attack name, the run loaded once (and kept in ``run_holder["run"]`` across calls) only if an
    attack really runs. ``params``: attack name -> parameter overrides on top of the preset."""

    holder = run_holder if run_holder is not None else {}
    out = {}
    for attack in attacks:
        kw = dict((params or {}).get(attack, {}))
        path, saved = saved_result(root, artifact, attack, preset=preset, params=kw, seed=seed,
                                   service_output=service_output)
        if saved is not None:
            say(f"attack {attack} on {_target_name(artifact, service_output)}: done already, skipped (re-using {path})")
            out[attack] = saved.to_json()
            continue
        if "run" not in holder:
            holder["run"] = load_run(root)
        result, _, _ = ensure_attacked(root, artifact, attack, preset=preset, params=kw, seed=seed, run=holder["run"],
                                       threads=threads, force=True, say=say, service_output=service_output)
        shown = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        say(f"attack {attack}: " + " ".join(f"{k} {v:.4g}" for k, v in list(shown.items())[:4])
            + f" in {result.timings.get('total_s', 0):.0f} s")
        out[attack] = result.to_json()
    return out
