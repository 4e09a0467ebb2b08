"""The ``qdefend`` command line. Heavy imports (torch, onnx, litert) happen inside each command so
that ``qdefend --help`` is instant. User mistakes raise :class:`QdefendError`, printed on one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import QdefendError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="qdefend: quantization-aware edge deployment toolkit for private split inference.",
)

LISTABLE = ("datasets", "models", "defenses", "attacks", "devices")
# The defended model `qdefend demo` trains beside the undefended one: the config of the README's
# privacy-utility frontier with the most decoder MSE within 2 accuracy points (a defense stack at its
# default parameters, and the cut: convs on the device; the undefended model keeps the reference cut).
DEMO_DEFENDED = {"defense": "nopeek", "cut": 4}
_ARGV: list[str] = []  # this invocation's arguments (set by main)


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _resolve_config(config: Optional[Path], flags: dict, overrides: list[str]):
    """defaults < --config file < command-line flags < --set KEY=VALUE."""
    from .config import RunConfig, apply_overrides, read_toml

    d: dict = {}
    if config is not None:
        if not config.is_file():
            raise QdefendError(f"--config {config}: no such file")
        d = read_toml(config, f"--config {config}")
    for key, value in flags.items():
        if value is not None:
            section, name = key.split(".", 1)
            d.setdefault(section, {})[name] = value
    apply_overrides(d, overrides)
    return RunConfig.from_dict(d)


@app.command()
def train(
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/MODEL-DATASET-DEFENSE-QAT)"),
    qat: Optional[str] = typer.Option(None, "--qat", help="int8 (QAT, default) or none (float)"),
    wire_bits: Optional[int] = typer.Option(None, "--wire-bits", help="bits per released feature on the wire: 8 (default), or 2..7 (bit-packed, trained with that fake-quant at the cut)"),
    wire_granularity: Optional[str] = typer.Option(None, "--wire-granularity", help="the wire grid: tensor (one scale, default) or channel (one per channel)"),
    wire_order: Optional[str] = typer.Option(None, "--wire-order", help="release_then_wire (noise, then the quantiser; default) or wire_then_release"),
    model: Optional[str] = typer.Option(None, "--model", help="split model (qdefend list models); default vgg11_bn"),
    cut: Optional[int] = typer.Option(None, "--cut", help="cut position (model's reference cut by default)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="dataset (qdefend list datasets); default fashion-mnist"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="folder holding the dataset files"),
    defense: Optional[str] = typer.Option(None, "--defense", help="defense stack, e.g. noise or noise+nopeek"),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="noise sigma (shortcut for --set defense.params.noise.sigma=...)"),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (0 = default)"),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML config file (e.g. a run's config.toml)"),
    from_run: Optional[Path] = typer.Option(None, "--from", help="initialise from this run's best checkpoint (e.g. QAT fine-tuning of a float run)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its latest checkpoint"),
    set_: list[str] = typer.Option([], "--set", help="override any config key: --set train.lr=0.01"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    nproc: int = typer.Option(1, "--nproc", help="train in N processes under torch.distributed (torchrun): gloo on CPU, NCCL on CUDA (one per GPU)"),
    nnodes: int = typer.Option(1, "--nnodes", help="machines taking part (each runs the same command with its --node-rank)"),
    node_rank: int = typer.Option(0, "--node-rank", help="this machine's rank among --nnodes (0 on the one at --rdzv-endpoint)"),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of node 0, for --nnodes > 1"),
):
    """Train a split network (edge encoder + cloud head), with int8 QAT and privacy defenses."""
    from . import api, distributed
    from .config import RunConfig, resume_config

    # --nproc N: this same command runs again in N processes under torchrun, which find the launcher's
    # environment (distributed.launched()) and train; what can be checked is checked here, once
    launch = None if distributed.launched() else distributed.LaunchConfig(nproc, nnodes, node_rank, rdzv_endpoint, threads or 0)
    launch = launch if launch is not None and launch.world > 1 else None
    console = _console() if os.environ.get("RANK", "0") == "0" else None  # torchrun's other workers stay quiet
    if resume:
        if out is None:
            raise QdefendError("--resume needs --out RUN_DIR naming the run to continue")
        fixed = {"--qat": qat, "--wire-bits": wire_bits, "--wire-granularity": wire_granularity,
                 "--wire-order": wire_order, "--model": model, "--cut": cut, "--dataset": dataset, "--data-dir": data_dir,
                 "--defense": defense, "--sigma": sigma, "--seed": seed, "--config": config, "--from": from_run}
        given = [flag for flag, v in fixed.items() if v is not None]
        if given:
            raise QdefendError(f"--resume continues {out} as it was configured, so {given[0]} cannot be given: drop it, "
                               "or train a new run with another --out")
        cfg = RunConfig.load(out / "config.toml")
        resume_flags = {"train.epochs": epochs, "train.device": device, "train.num_threads": threads}
        if launch is not None:
            resume_config(cfg, list(set_), resume_flags)  # refused changes are refused once, here
            _launch_train(out, True, launch, cfg.train.device if device is None else device)
            return
        _say(console, f"[bold]qdefend train[/bold] -> {out}  (resuming {cfg.model.name} on {cfg.data.name}, "
                      f"qat {cfg.quant.scheme}, defense {cfg.defense.stack})")
        trained = api.train(None, out, overrides=set_, resume=True, console=console, progress=not quiet,
                            resume_flags=resume_flags)
        _print_test(console, trained.test)
        return
    flags = {
        "quant.scheme": qat, "quant.wire_bits": wire_bits, "quant.wire_granularity": wire_granularity,
        "quant.wire_order": wire_order, "model.name": model, "model.cut": cut, "data.name": dataset,
        "data.data_dir": data_dir, "defense.stack": defense, "train.epochs": epochs,
        "train.seed": seed, "train.device": device, "train.num_threads": threads,
        "init_from": None,
    }
    overrides = list(set_)
    if sigma is not None:
        overrides.insert(0, f"defense.params.noise.sigma={sigma}")
    cfg = _resolve_config(config, flags, overrides)
    if seed is not None:
        cfg.data.seed = seed
    if from_run is not None:
        cfg.init_from = str(from_run)
    if out is None:
        out = Path("runs") / f"{cfg.model.name}-{cfg.data.name}-{cfg.defense.stack.replace('+', '_')}-{cfg.quant.scheme}"
    if launch is not None:
        _launch_train(out, False, launch, cfg.train.device)
        return
    wire = "" if not cfg.quant.custom_wire else (f", wire {cfg.quant.wire_bits}-bit per {cfg.quant.wire_granularity}"
                                                 f" {cfg.quant.wire_order}")
    _say(console, f"[bold]qdefend train[/bold] -> {out}  ({cfg.model.name} on {cfg.data.name}, qat {cfg.quant.scheme}, "
                  f"defense {cfg.defense.stack}{wire})")
    _print_test(console, api.train(cfg, out, console=console, progress=not quiet).test)


def _say(console, msg: str) -> None:
    if console is not None:
        console.print(msg)


def _launch_train(out: Path, resume: bool, launch, device: str) -> None:
    """``qdefend train --nproc N``: run this same command in N processes under torchrun (each joins
    the process group; see qdefend.distributed) once the run directory is known to fit."""
    from . import distributed
    from .checkpoint import has_checkpoint
    from .run import RunPaths

    paths = RunPaths(out)
    if resume and not has_checkpoint(paths.checkpoints):
        raise QdefendError(f"--resume: {out} has no checkpoint to resume; drop --resume to start it")
    if not resume and has_checkpoint(paths.checkpoints):
        raise QdefendError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < launch.nproc:
            raise QdefendError(f"--nproc {launch.nproc} --device cuda runs one process per GPU, but this machine has "
                               f"{torch.cuda.device_count()}: use --nproc {max(1, torch.cuda.device_count())} "
                               "(or --device cpu)")
    _console().print(f"[bold]qdefend train[/bold] -> {out}  ({launch.world} processes, {launch.nproc} on this machine"
                     + (f", node {launch.node_rank} of {launch.nnodes} meeting at {launch.rdzv_endpoint}"
                        if launch.nnodes > 1 else "") + "; torch.distributed)")
    distributed.launch(launch, _ARGV, run_dir=str(out))  # rank 0 prints the epochs and the test accuracy


def _print_test(console, rec: dict) -> None:
    from rich.table import Table

    if console is None or not rec:
        return
    t = Table(title="test accuracy (best checkpoint, release transform applied)")
    t.add_column("model")
    t.add_column("accuracy", justify="right")
    for k, label in (("test_acc_float", "float"), ("test_acc_fakequant", "float / fake-quant (QAT)"), ("test_acc_int8", "converted int8")):
        if k in rec:
            t.add_row(label, f"{100 * rec[k]:.2f}%")
    console.print(t)
    if "test_acc_int8" in rec and "test_acc_fakequant" in rec:
        console.print(f"int8 - fake-quant: {100 * (rec['test_acc_int8'] - rec['test_acc_fakequant']):+.2f} points")


@app.command("export")
def export_(
    run: Path = typer.Argument(..., help="trained run directory, e.g. runs/demo"),
    format_: str = typer.Option("onnx,tflite", "--format", help="int8 encoder formats: onnx, tflite or both"),
    calibrate: Optional[int] = typer.Option(None, "--calibrate", help="runs trained without QAT: post-training calibration on N aux images"),
    verify_images: Optional[int] = typer.Option(None, "--verify-images", help="verify on the first N test images (default: all)"),
):
    """Export a run's int8 encoder (ONNX, TFLite) and cloud head, verify them, write manifest.json."""
    from . import api

    console = _console()
    exported = api.export(run, format_.split(","), calibrate=calibrate, verify_images=verify_images,
                          progress=lambda line: console.print(f"  {line}"))
    _print_export(console, run, exported.manifest)


def _print_export(console, run: Path, m: dict) -> None:
    from rich.table import Table

    v = m.get("verification", {}).get("artifacts", {})
    t = Table(title=f"{run}/artifacts (verified on the test split, release off for parity)")
    for col in ("artifact", "size KiB", "test acc", "top-1 agree", "max LSB", "cosine"):
        t.add_column(col, justify="left" if col == "artifact" else "right")
    for name, e in m["artifacts"].items():
        a = v.get(name, {})
        p = a.get("parity", {})
        t.add_row(name, f"{e['size_bytes'] / 1024:.1f}", f"{100 * a['test_acc']:.2f}%" if "test_acc" in a else "-",
                  f"{100 * a['top1_agreement']:.2f}%" if "top1_agreement" in a else "-",
                  str(p.get("max_abs_lsb", "-")), f"{p['cosine']:.6f}" if "cosine" in p else "-")
    console.print(t)
    for w in m.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    acc = m.get("verification", {}).get("acceptance", {})
    if acc:
        console.print(f"acceptance: {'passed' if acc.get('passed') else '[bold red]FAILED[/]'} ({acc.get('note', '')})")


@app.command("inspect")
def inspect_(artifact: Path = typer.Argument(..., help="an exported file, e.g. runs/demo/artifacts/encoder.int8.tflite"),
             json_: bool = typer.Option(False, "--json", help="print JSON instead of tables")):
    """Show what an artifact holds: op dtypes (int8 or not), size, I/O quantization, parity figures."""
    from .export.inspect import inspect_artifact, render

    info = inspect_artifact(artifact)
    if json_:
        import json

        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        render(info, _console())


@app.command()
def attack(
    run: Path = typer.Argument(..., help="trained (and exported) run directory, e.g. runs/demo"),
    artifact: str = typer.Option("encoder.int8.tflite", "--artifact", help="target: an exported encoder "
                                 "(encoder.int8.tflite, encoder.int8.onnx, encoder.float.onnx), torch-float, "
                                 "torch-int8, or service:ENCODER"),
    attack_: str = typer.Option("decoder", "--attack", help="attack name (qdefend list attacks)"),
    budget: Optional[str] = typer.Option(None, "--budget", help="queries the attacker may spend (extraction: a list, e.g. 1000,10000)"),
    preset: Optional[str] = typer.Option(None, "--preset", help="named settings, e.g. quick"),
    seed: int = typer.Option(0, "--seed"),
    output: str = typer.Option("probabilities", "--output", help="what a service answers: probabilities or labels"),
    service_output: Optional[str] = typer.Option(
        None, "--service-output", help="output defense on the service's probabilities, top-1 kept: round:2, "
        "topk:3, reverse_sigmoid:beta=1,gamma=0.1 (join with +)"),
    overrides: list[str] = typer.Option([], "--set", help="attack parameter KEY=VALUE (repeatable), e.g. --set epochs=10"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress lines"),
):
    """Run one attack on one target of a run; writes runs/NAME/attacks/ATTACK-TARGET.json (+ .png grid)."""
    from . import api
    from .attacks.runner import parse_params

    console = _console()
    res = api.attack(run, attack_, artifact, preset=preset, params=parse_params(overrides), budget=budget,
                     seed=seed, output=output, progress=None if quiet else (lambda m: console.print(f"  {m}")),
                     service_output=service_output)
    _print_attack(console, res, Path(res.extra["path"]))


def _print_attack(console, res, path: Path) -> None:
    from rich.table import Table

    t = Table(title=f"{res.attack} on {res.target} (seed {res.seed})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in res.metrics.items():
        if "@" in k or k.endswith(("_lo", "_hi")):
            continue
        lo, hi = res.metrics.get(f"{k}_lo"), res.metrics.get(f"{k}_hi")
        t.add_row(k, f"{v:.4f}" + (f"  [{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else ""))
    console.print(t)
    for n in res.notes:
        console.print(f"note: {n}")
    console.print(f"wrote {path}" + (f" and {path.with_suffix('.png')}" if res.reconstructions is not None else ""))


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="run directories (trained and exported)"),
    attacks: str = typer.Option("decoder,clone_rmle,knockoff", "--attacks", help="comma-separated attack names"),
    artifacts: str = typer.Option("encoder.float.onnx,encoder.int8.tflite", "--artifacts",
                                  help="comma-separated targets to compare (float first)"),
    out: Optional[Path] = typer.Option(None, "--out", help="report folder (default RUN/report for one run, report/ for several)"),
    quick: bool = typer.Option(False, "--quick", help="the attacks' quick presets (smoke runs, tests)"),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="re-run attacks whose results already exist"),
    jobs: int = typer.Option(0, "--jobs", help="worker processes, one target each (0 = one per CPU)"),
    presets: list[str] = typer.Option([], "--preset", help="ATTACK=PRESET (repeatable), e.g. --preset decoder=fast"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="one of the runs (the undefended one): the report "
                                            "also says what every other run's defense buys against it, at what accuracy"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress lines"),
):
    """Float vs int8: run the attacks on each run's artifacts; write report.md, report.json, figures.
    With --baseline, also each defended run against the undefended one."""
    from . import api
    from .attacks.report import parse_presets

    console = _console()
    rep = api.compare(runs, out=out, progress=None if quiet else (lambda m: console.print(m)),
                      attacks=[a for a in attacks.split(",") if a], artifacts=[a for a in artifacts.split(",") if a],
                      quick=quick, seed=seed, force=force, jobs=jobs, presets=parse_presets(presets),
                      baseline=str(baseline) if baseline else None)
    _print_verdicts(console, rep.data)
    console.print(f"report: {rep.out}/report.md")


def _print_verdicts(console, report: dict) -> None:
    """Each run's int8-vs-float verdicts, then what each defense buys against the baseline (if any)."""
    for entry in report["runs"]:
        for v in entry["verdicts"]:
            console.print(f"{entry['name']} {v['attack']}: {v['text']}")
    for entry in report["runs"]:
        for g in entry.get("gains", []):
            cost = "" if g["acc_change_points"] is None else f" at {g['acc_change_points']:+.2f} accuracy points"
            console.print(f"{entry['name']} vs {Path(report['baseline']).name}, {g['attack']} on {g['artifact']}"
                          f"{cost}: {g['text']}")


@app.command()
def partition(
    model: Optional[str] = typer.Option(None, "--model", help="split model (qdefend list models); default vgg11_bn"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="dataset (qdefend list datasets); default fashion-mnist"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="folder holding the dataset files"),
    from_run: Optional[Path] = typer.Option(None, "--from", help="load this run's trained edge (stem + stages up to its cut), frozen"),
    attack_: bool = typer.Option(False, "--attack", help="also measure the decoder-attack MSE at every cut"),
    epochs: int = typer.Option(1, "--epochs", help="training epochs of the analysis model"),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="Gaussian feature noise for the entropy estimate and the attack (default: the --from run's, else 0)"),
    width: Optional[float] = typer.Option(None, "--width", help="channel width of the analysis model (default 0.5, or the --from run's)"),
    limit_train: Optional[int] = typer.Option(20000, "--limit-train", help="train the analysis model on this many images"),
    limit_eval: Optional[int] = typer.Option(None, "--limit-eval", help="evaluate on the first N test images (default: all)"),
    similarity: bool = typer.Option(True, "--similarity/--no-similarity", help="float-vs-int8 and adjacent-cut KL"),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default runs/partition-MODEL-DATASET)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Where to cut: R_c^2 and the Golden Partition Zone, cost, entropy bound estimate, float-vs-int8 KL
    and (--attack) decoder-attack MSE at every cut; writes OUT/partition.json and OUT/partition.png."""
    from .analysis.partition import PartitionConfig, analyze_partition
    from .analysis.report import render

    console = _console()
    cfg = PartitionConfig(model=model, dataset=dataset, data_dir=data_dir, width=width, epochs=epochs,
                          limit_train=limit_train, seed=seed, from_run=str(from_run) if from_run else None,
                          sigma=sigma, limit_eval=limit_eval, similarity=similarity, attack=attack_,
                          out=str(out) if out else None)
    render(analyze_partition(cfg, console=console, progress=not quiet), console)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory of the undefended model"),
    epochs: int = typer.Option(2, "--epochs"),
    defense: str = typer.Option(DEMO_DEFENDED["defense"], "--defense", help="the defended model's defense stack, "
                                "at its default parameters (e.g. nopeek, noise+nopeek, none)"),
    cut: int = typer.Option(DEMO_DEFENDED["cut"], "--cut", help="where the defended model is cut: convs on the device "
                            "(the undefended model keeps the reference cut, 2); --defense none --cut 2: undefended only"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    quick: bool = typer.Option(False, "--quick", "--quick-attacks", help="the attacks' quick presets (a smoke run), as `compare --quick`"),
):
    """The main job on the default data (Fashion-MNIST): QAT int8 training of the reference split,
    undefended and with the recommended defense, int8 export of both to ONNX and TFLite with
    verification, then the attack comparison (decoder, extract-then-invert, KnockoffNets) written to
    OUT/report/report.md: does each model's privacy survive int8, and what does the defense buy
    against the undefended model, at what accuracy.

    Re-running continues where it stopped: an interrupted training resumes, finished stages are kept.
    """
    from .config import RunConfig
    from .defenses import parse_stack
    from .models import reference_cut, valid_cuts
    from .stages import ensure_exported, ensure_trained

    console = _console()
    # what is wrong fails here, before anything is trained
    stack = "+".join(parse_stack(defense)) or "none"
    model = RunConfig().model.name
    ref, cuts = reference_cut(model), valid_cuts(model)
    if cut not in cuts:
        raise QdefendError(f"--cut {cut} is not a cut of {model}: use --cut {cuts[0]}..{cuts[-1]} (convs on the "
                           f"device; the default {DEMO_DEFENDED['cut']}, the reference {ref}).")
    defended = RunConfig.from_dict({"train": {"epochs": epochs}, "defense": {"stack": stack}, "model": {"cut": cut}})
    runs = [(out, RunConfig.from_dict({"train": {"epochs": epochs}}), "undefended")]
    if stack != "none" or cut != ref:
        name = "-".join([out.name] + ([stack.replace("+", "_")] if stack != "none" else []) + ([f"cut{cut}"] if cut != ref else []))
        runs.append((out.with_name(name), defended, f"defense {stack}, cut {cut} (the reference cut is {ref})"))
    for root, cfg, what in runs:
        console.print(f"[bold]qdefend demo[/bold] -> {root}: train (int8 QAT, {epochs} epochs, {what})")
        trained = ensure_trained(root, cfg, console=console, progress=not quiet, say=lambda m: console.print(f"  {m}"))
        _print_test(console, trained.test)

        console.print(f"[bold]qdefend demo[/bold] -> {root}: export (int8 ONNX + TFLite, verified)")
        m = ensure_exported(root, say=lambda line: console.print(f"  {line}"),
                            progress=lambda line: console.print(f"  {line}"))
        _print_export(console, root, m)

    from . import api
    from .attacks.report import DEMO_PRESETS, preset_gap

    console.print(f"[bold]qdefend demo[/bold] -> {out / 'report'}: compare float vs int8 under attack "
                  f"(decoder, clone_rmle, knockoff{'; quick presets' if quick else ''})"
                  + ("" if len(runs) == 1 else f", and {runs[1][0].name} against the undefended model"))
    if not quick:
        console.print(f"note: {preset_gap('decoder', DEMO_PRESETS['decoder'])}")
    rep = api.compare([r for r, _, _ in runs], out=out / "report", quick=quick, presets=dict(DEMO_PRESETS),
                      baseline=str(out) if len(runs) > 1 else None, progress=None if quiet else console.print)
    _print_verdicts(console, rep.data)
    console.print(f"report: {rep.out}/report.md")


@app.command("bundle")
def bundle_(
    run: Path = typer.Argument(..., help="exported run directory, e.g. runs/demo"),
    device: str = typer.Option(..., "--device", help="device profile (qdefend list devices), e.g. rpi5"),
    format_: Optional[str] = typer.Option(None, "--format", help="tflite or onnx (default: the device's)"),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="litert, tflite-runtime or onnxruntime (default: the device's)"),
    out: Optional[Path] = typer.Option(None, "--out", help="archive path or folder (default RUN/bundles/)"),
    with_wheels: bool = typer.Option(False, "--with-wheels", help="also pip download the device's wheels into wheels/ (needs network)"),
    server: Optional[str] = typer.Option(None, "--server", help="the qdefend serve URL the bundle sends features to, e.g. https://cloud:8000"),
):
    """Package a run's int8 encoder for one device: artifact, runtime, standalone runner.py, pinned
    requirements, reference outputs; one .tar.gz to copy onto it (then `python3 runner.py --check`)."""
    from .devices.bundle import bundle_top, make_bundle

    path = make_bundle(run, device, fmt=format_, runtime=runtime, out=out, with_wheels=with_wheels, server=server)
    top = bundle_top(path)
    if device == "phone-web":
        typer.echo(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)\nhost {top}/ on a static https server, "
                   "start `qdefend serve RUN --allow-origin https://THAT-HOST`, open the page on the phone")
        return
    typer.echo(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)\non the device: tar xzf {path.name} && "
               f"cd {top}, install as its README.md says, then: python3 runner.py --check")


@app.command()
def deploy(
    bundle: Path = typer.Argument(..., help="a bundle archive made by `qdefend bundle`"),
    ssh: Optional[str] = typer.Option(None, "--ssh", help="user@host[:dir] (dir default ~/qdefend-bundles)"),
    adb: Optional[str] = typer.Option(None, "--adb", help="adb device serial (adb devices)"),
    port: Optional[int] = typer.Option(None, "--port", help="ssh port"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="ssh private key file"),
    python: str = typer.Option("python3", "--python", help="the device's Python (with numpy and the runtime)"),
    ssh_option: list[str] = typer.Option([], "--ssh-option", help="extra ssh/scp -o KEY=VALUE (repeatable)"),
    bench: bool = typer.Option(False, "--bench", help="after the check, also run runner.py --bench"),
    send: Optional[str] = typer.Option(None, "--send", help="then send the reference images' features to this qdefend serve URL"),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="--send: the server's token (goes over the ssh/adb stdin)"),
):
    """Copy a bundle onto a device (ssh/scp or adb), unpack it, run its runner.py --check there
    (and, with --send URL, a round trip to qdefend serve); prints the JSON."""
    import json

    from .devices.deploy import deploy_adb, deploy_ssh
    from .edge.client import read_token

    if (ssh is None) == (adb is None):
        raise QdefendError("pass exactly one of --ssh user@host[:dir] or --adb SERIAL")
    if token_file is not None and send is None:
        raise QdefendError("--token-file goes with --send URL (the server the device sends features to)")
    token = read_token(str(token_file)) if token_file is not None else None
    if ssh is not None:
        res = deploy_ssh(bundle, ssh, port=port, identity=identity, python=python, options=ssh_option, bench=bench,
                         send=send, token=token)
    else:
        res = deploy_adb(bundle, adb, python=python, bench=bench, send=send, token=token)
    typer.echo(json.dumps(res, sort_keys=True))
    if "send" in res and not res["send"].get("ok"):
        raise QdefendError(f"the device on {res['target']} could not send to {send}: "
                           f"{res['send'].get('error', 'see the JSON above')}")
    if not res["ok"]:
        raise QdefendError(f"the bundle check on {res['target']} failed: {res['check'].get('error', 'see the JSON above')}")


@app.command()
def serve(
    runs: list[str] = typer.Argument(..., help="exported run directory, e.g. runs/demo; with --zoo several RUN[:int8|float]"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, "--port", help="TCP port"),
    workers: int = typer.Option(1, "--workers", help="uvicorn worker processes"),
    threads: int = typer.Option(1, "--threads", help="ONNX Runtime threads per worker"),
    head: str = typer.Option("int8", "--head", help="int8 (head.int8.onnx) or float (head.float.onnx)"),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="file holding the bearer token clients send"),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help="no token (loopback only)"),
    max_batch: int = typer.Option(256, "--max-batch", help="most samples in one request (sets the body limit)"),
    allow_origin: list[str] = typer.Option([], "--allow-origin", help="CORS origin of a phone-web bundle's host (repeatable)"),
    web_runtime: Optional[Path] = typer.Option(None, "--web-runtime", help="onnxruntime-web dist folder (default: the npm install)"),
    ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="TLS certificate (phones need https for sha256 checks)"),
    ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="TLS private key"),
    zoo: bool = typer.Option(False, "--zoo", help="serve a model zoo: several heads over one encoder, picked per "
                             "request from its X-Qdefend-Accuracy / X-Qdefend-Latency-Ms targets"),
    target_noise: Optional[str] = typer.Option(None, "--target-noise", help="--zoo defense: noise on the requested "
                                               "targets, DIST:ACC[,LAT] with DIST gaussian, uniform or drop (ACC: the "
                                               "probability of a drop), e.g. gaussian:0.02 or drop:0.6"),
    zoo_seed: Optional[int] = typer.Option(None, "--zoo-seed", help="seed of the target noise"),
    latency_resolution_ms: float = typer.Option(0.25, "--latency-resolution-ms", help="--zoo: latency profiles are "
                                                "rounded up to this (heads of one architecture then cost the same)"),
):
    """Serve the cloud head of an exported run: POST /v1/infer takes int8 features, answers labels;
    GET / is the phone-browser page that runs the encoder in the browser. With --zoo, several heads
    over one encoder, one picked per request by its accuracy / latency targets."""
    from .serve.app import serve as run_server
    from .serve.service import ServeConfig

    if len(runs) > 1 and not zoo:
        raise QdefendError(f"qdefend serve takes one run, got {len(runs)}: add --zoo to serve them as a model zoo")
    run = Path(runs[0])
    cfg = ServeConfig(run=str(run), head=head, host=host, port=port, workers=workers, threads=threads,
                      max_batch=max_batch, token_file=str(token_file) if token_file else None,
                      insecure_no_auth=insecure_no_auth, allow_origins=list(allow_origin),
                      web_runtime=str(web_runtime) if web_runtime else None,
                      ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                      ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
                      zoo=list(runs) if zoo else [], target_noise=target_noise, zoo_seed=zoo_seed,
                      latency_resolution_ms=latency_resolution_ms)
    scheme = "https" if ssl_certfile else "http"
    what = f"a zoo of {len(runs)} heads" if zoo else f"{run} ({cfg.head} head)"
    typer.echo(f"serving {what} on {scheme}://{host}:{port}  (page: /, API: /v1/infer, "
               f"metrics: /metrics; Ctrl-C stops)", err=True)
    run_server(cfg)


devices_app = typer.Typer(no_args_is_help=True, help="Edge devices: run a bundle on an emulated Raspberry Pi.")
app.add_typer(devices_app, name="devices")


@devices_app.command("emulate")
def devices_emulate(
    bundle: Path = typer.Argument(..., help="a bundle .tar.gz or folder made by `qdefend bundle`"),
    device: str = typer.Option("rpi4", "--device", help="rpi4 (qemu -cpu cortex-a72), rpi5 (cortex-a76) or generic-aarch64"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="cache folder (default $QDEFEND_CACHE or ~/.cache/qdefend)"),
    timeout: float = typer.Option(1800.0, "--timeout", help="seconds allowed for the emulated runner.py --check"),
    json_: bool = typer.Option(False, "--json", help="print only the runner's JSON result"),
):
    """Run a bundle's runner.py --check under QEMU user-mode arm64 (Debian bookworm, Python 3.11, glibc 2.36):
    its int8 features must match the x86 reference bit for bit. The first run builds the arm64 rootfs (~2-3 min, as root)."""
    import json

    from .devices.emulate import emulate

    res = emulate(bundle, device=device, cache_dir=cache_dir, timeout_s=timeout,
                  progress=lambda m: typer.echo(m, err=True))
    if not json_:
        e = res["emulation"]
        typer.echo(f"runner.py --check passed on emulated {e['device']} (qemu {e['qemu']} -cpu {e['qemu_cpu']}, "
                   f"Python {e['python']}, glibc {e['glibc']}) in {e['seconds'].get('check', 0):.1f} s")
    typer.echo(json.dumps(res, sort_keys=True))


def registry_for(what: str):
    """The registry behind ``qdefend list WHAT``."""
    if what == "datasets":
        from .data import DATASETS as reg
    elif what == "models":
        from .models import MODELS as reg
    elif what == "defenses":
        from .defenses import DEFENSES as reg
    elif what == "attacks":
        from .attacks import ATTACKS as reg
    elif what == "devices":
        from .devices.profiles import DEVICES as reg
    else:
        raise QdefendError(f"cannot list '{what}'. Valid: {', '.join(LISTABLE)}")
    return reg


@app.command("list")
def list_(what: str = typer.Argument(..., help="datasets | models | defenses | attacks | devices")):
    """List the registered datasets, models, defenses, attacks or device profiles."""
    reg = registry_for(what)
    for name in reg.names():
        typer.echo(f"{name:16s} {reg.describe(name)}")


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts) of every click the installed typer may raise from: typer >= 0.20
    bundles its own copy as ``typer._click``, older ones use the ``click`` package."""
    import importlib

    usage, abort = [], [typer.Abort]
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage.append(mod.ClickException)
        if hasattr(mod, "Abort"):
            abort.append(mod.Abort)
    return tuple(usage), tuple(abort)


def _usage_line(e) -> str:
    """A click usage error on one line, with where to read the usage: 'No such option: --bogus
    (see `qdefend train --help`)'."""
    msg = " ".join(str(e.format_message()).split())
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None and getattr(ctx, "command_path", "") else "qdefend"
    return f"{msg} (see `{where} --help`)"


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line on stderr and exit 2, never a traceback."""
    import warnings

    from .edge.manifest import ArtifactError

    global _ARGV
    _ARGV = list(sys.argv[1:] if argv is None else argv)  # what `train --nproc` runs again in each process
    usage_errors, aborts = _click_exceptions()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch/torchao internals, not the user's
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        rc = app(args=argv, standalone_mode=False, prog_name="qdefend")
        return rc if isinstance(rc, int) else 0
    except (QdefendError, ArtifactError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except usage_errors as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `qdefend` / `qdefend attack`: the help is the answer
            if str(e.format_message()).strip():
                e.show()
            return 0
        print(f"error: {_usage_line(e)}", file=sys.stderr)
        return 2
    except aborts:
        print("aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: the last completed epoch is checkpointed; continue with --resume", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only folder, a file that vanished under us
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}: free space or fix the permissions, then run the command again",
              file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours: still one line, with where it happened; the full stack on request
        import traceback

        if os.environ.get("QDEFEND_TRACEBACK"):
            raise
        frame = traceback.extract_tb(e.__traceback__)[-1]
        why = " ".join(str(e).split())[:200]
        print(f"error: internal error {type(e).__name__}: {why} (at {Path(frame.filename).name}:{frame.lineno}); "
              "this is a bug in qdefend: rerun with QDEFEND_TRACEBACK=1 and report the traceback", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
