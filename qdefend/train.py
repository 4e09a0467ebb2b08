"""Training of a split network with optional int8 QAT and privacy defenses.

One epoch: the encoder (fake-quant under ``--qat int8``) computes z, the defense stack releases
z~ = release(z), the head classifies z~. Loss = CE + the defenses' loss terms; terms a defense marks
as encoder-only (CEM) are back-propagated first, their encoder gradients kept and added after the
task backward. After every epoch: validation accuracy of the fake-quant model AND of the converted
int8 model, an atomic checkpoint, and one line in metrics.jsonl. A NaN/Inf loss stops training and
keeps the last good checkpoint; ``--resume`` continues from the latest checkpoint.

Under torchrun (``qdefend train --nproc N``) the same loop runs in every process: each takes its
share of every global batch, the split forward runs under DistributedDataParallel, and
:mod:`qdefend.distributed` keeps quantization ranges, BatchNorm statistics and defense state
identical on every rank; rank 0 alone evaluates and writes files.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, quant
from .allocator import keep_freed_memory
from .checkpoint import has_checkpoint, load_checkpoint, resolve_tag, save_checkpoint, write_lines_atomic
from .config import RunConfig
from .data import Split, batches
from .defenses import StepContext, EpochContext, resolved_params
from .errors import NonFiniteLossError, QdefendError
from .run import Run, RunPaths, build_run, load_parts, load_run


MAX_LOSS_PER_NAT = 25.0  # divergence: a batch's task loss above 25 x ln(classes) (57.6 for 10 classes)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one reduction per tensor, one sync)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def state_finite(key: str, v) -> bool:
    """Whether a state-dict entry is sound: no NaN, and finite unless it is an observer's min/max,
    which start at +-inf until the observer sees data."""
    if not (torch.is_tensor(v) and v.is_floating_point()):
        return True
    if key.endswith(("min_val", "max_val")):
        return not bool(torch.isnan(v).any())
    return bool(torch.isfinite(v).all())


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise QdefendError("--device cuda asked for, but this torch build sees no CUDA GPU: use --device cpu")
    return torch.device(name)


def release_generator(seed: int, epoch: int, device: torch.device, rank: int = 0) -> torch.Generator:
    """Seeded generator for the release transform, so noise is reproducible per (seed, epoch); each
    rank of a distributed run draws its own stream."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 100_003 + epoch + rank * 1_000_003)
    return g


@torch.no_grad()
def predict(
    encoder: Callable, head: Callable, split: Split, run: Run, *, device: torch.device,
    release: bool = True, seed: int = 12345, batch_size: int = 512,
) -> np.ndarray:
    """Predicted labels over a split, with the defense's release transform applied (as deployed)."""
    gen = release_generator(seed, 0, device)
    preds = []
    for xb, _ in batches(split, batch_size, shuffle=False):
        x = torch.from_numpy(run.data.normalization.apply(xb)).to(device)
        z = encoder(x)
        if release:
            z = run.release(z, gen)
        preds.append(head(z).argmax(1).cpu().numpy())
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def accuracy(encoder, head, split: Split, run: Run, *, device: torch.device, **kw) -> float:
    return float((predict(encoder, head, split, run, device=device, **kw) == split.labels).mean())


@torch.no_grad()
def features(encoder: Callable, split: Split, run: Run, *, device: torch.device, batch_size: int = 512):
    """Noise-free encoder outputs over a split: ``(z, y)`` as torch tensors (for epoch hooks)."""
    zs = []
    for xb, _ in batches(split, batch_size, shuffle=False):
        zs.append(encoder(torch.from_numpy(run.data.normalization.apply(xb)).to(device)))
    return torch.cat(zs), torch.from_numpy(split.labels).to(device)


def _state_tensors(run: Run) -> list[torch.Tensor]:
    """Everything a rank's training state holds: weights, buffers (quantization ranges, BN
    statistics) and the defense's module."""
    mod = run.defense.module()
    return [*run.net.state_dict().values(), *(mod.state_dict().values() if mod is not None else [])]


class SplitForward(nn.Module):
    """encoder -> release -> head as one module: the unit DistributedDataParallel wraps (a DDP
    forward must run through the wrapper for its backward to reduce the gradients)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, release: Callable):
        super().__init__()
        self.encoder, self.head = encoder, head
        self._release = release

    def forward(self, x: torch.Tensor, generator: torch.Generator):
        z = self.encoder(x)
        zr = self._release(z, generator)
        return z, zr, self.head(zr)


class _NoStep:
    """The optimizer when ``train.freeze`` leaves no network weight to train (a defense such as
    Shredder then trains only its own parameters): it keeps the learning-rate schedule visible to
    the defenses (CEM reads it) and checkpoints like a real optimizer without state."""

    def __init__(self, lr: float):
        self.param_groups = [{"lr": lr, "params": []}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": self.param_groups}

    def load_state_dict(self, sd: dict) -> None:
        self.param_groups = [dict(g) for g in sd["param_groups"]]


class Trainer:
    """Trains one run directory; see the module docstring for the loop."""

    def __init__(self, cfg: RunConfig, out: Path | str, *, console=None, progress: bool = True):
        self.cfg = cfg
        self.paths = RunPaths(out)
        self.console = console
        self.progress = progress
        self.dist = distributed.SINGLE  # the process group, joined in fit() under torchrun

    # -- set-up -----------------------------------------------------------------------------
    def _init_weights(self) -> dict | None:
        src = self.cfg.init_from
        if not src:
            return None
        spaths = RunPaths(src)
        spaths.require_trained()
        scfg = RunConfig.load(spaths.config)
        if scfg.model != self.cfg.model:
            raise QdefendError(f"--from {src}: its model config differs from this run's; use the same --model and cut")
        parts, _, _ = load_checkpoint(spaths.checkpoints, "best" if (spaths.checkpoints / "best.json").exists() else "latest", with_optimizer=False)
        if scfg.quant.scheme == "none":
            return {"float": parts}
        if scfg.quant.scheme == self.cfg.quant.scheme and scfg.quant.quantize_head == self.cfg.quant.quantize_head:
            return {"same": parts}
        raise QdefendError(
            f"--from {src}: a {scfg.quant.scheme} run cannot initialise a {self.cfg.quant.scheme} run; "
            "start from a float run (--qat none) instead"
        )

    def _freeze(self, net) -> list[torch.nn.Module]:
        """Parts named by ``train.freeze``: no gradient step, eval mode (BN running statistics and
        quantization ranges fixed). Freezing only makes sense on trained weights, so it needs --from."""
        which = self.cfg.train.freeze
        if which == "none":
            return []
        parts = {"encoder": [net.encoder], "head": [net.head], "network": [net.encoder, net.head]}[which]
        for m in parts:
            m.requires_grad_(False)
        return parts

    def _optimizer(self, params) -> torch.optim.Optimizer:
        t = self.cfg.train
        if t.optimizer == "adam":
            return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=False)

    def lr_at(self, step: int, epoch: int, steps_per_epoch: int) -> float:
        """Learning rate, a pure function of progress so a resumed run continues the same curve."""
        t = self.cfg.train
        if t.schedule == "cosine":
            total = max(1, t.epochs * steps_per_epoch)
            return t.lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        if t.schedule == "step":
            return t.lr * t.gamma ** sum(epoch >= m for m in t.milestones)
        return t.lr

    # -- main loop --------------------------------------------------------------------------
    def fit(self, *, resume: bool = False, changed: dict[str, list] | None = None) -> dict[str, Any]:
        """Train (or, with ``resume``, continue) the run; ``changed`` lists the config keys a resume
        changed (``{key: [old, new]}``, see :func:`qdefend.config.resume_config`), recorded in
        config.toml and as a ``resume`` event in metrics.jsonl."""
        cfg = self.cfg
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        keep_freed_memory()
        if not distributed.launched():
            return self._fit(pick_device(cfg.train.device), resume, changed)
        self.dist, device = distributed.join(cfg.train.device)
        try:
            return self._fit(device, resume, changed)
        except RuntimeError as e:
            if not distributed.lost_peer(e):
                raise
            raise QdefendError(
                f"training process rank {self.dist.rank} lost contact with the others ({' '.join(str(e).split())[:160]}); "
                f"the run stops and its last finished epoch is checkpointed: continue with "
                f"qdefend train --out {self.paths.root} --resume --nproc N") from None
        finally:
            distributed.leave()

    def _fit(self, device: torch.device, resume: bool, changed: dict[str, list] | None) -> dict[str, Any]:
        cfg, paths, dist = self.cfg, self.paths, self.dist
        if has_checkpoint(paths.checkpoints) and not resume:
            raise QdefendError(
                f"{paths.root} already holds a run: pass --resume to continue it, or choose another --out"
            )
        if resume and not has_checkpoint(paths.checkpoints):
            raise QdefendError(f"--resume: {paths.root} has no checkpoint to resume; drop --resume to start it")

        if cfg.train.freeze != "none" and not cfg.init_from:
            raise QdefendError(
                f"train.freeze={cfg.train.freeze} keeps weights fixed, so it needs trained ones: add --from runs/BASE "
                "(a run with the same model), or drop --set train.freeze")
        if cfg.train.batch_size < dist.world:
            raise QdefendError(f"train.batch_size {cfg.train.batch_size} is the global batch and must give each of the "
                               f"{dist.world} processes a sample: use --set train.batch_size={dist.world * 64} or fewer processes")
        if cfg.train.nproc != dist.world:  # the processes that train it, recorded (a resume may change them)
            if resume:
                changed = {**(changed or {}), "train.nproc": [cfg.train.nproc, dist.world]}
            cfg.train.nproc = dist.world
        dist.barrier()  # every rank has checked the run directory before rank 0 writes to it
        init = None if resume else self._init_weights()
        run = build_run(cfg, float_init=init.get("float") if init else None)
        why = run.defense.needs_trained_network
        if why and not cfg.init_from:
            raise QdefendError(f"{why}: add --from runs/BASE (a trained run of the same model), or choose another "
                               "schedule (--set defense.params.cem.schedule=lr)")
        run.paths = paths
        self._data = run.data
        if init and "same" in init:
            load_parts(run, init["same"])
        cfg.defense.params = resolved_params(run.defense)
        net = run.net.to(device)
        if cfg.train.channels_last:
            net.to(memory_format=torch.channels_last)
        dmod = run.defense.module()
        if dmod is not None:
            dmod.to(device)
        self._frozen = self._freeze(net)
        trainable = [p for p in net.parameters() if p.requires_grad]
        opt = self._optimizer(trainable) if trainable else _NoStep(cfg.train.lr)

        start_epoch, step, best = 0, 0, -1.0
        if resume:
            parts, opt_state, state = load_checkpoint(paths.checkpoints, "latest")
            load_parts(run, parts)
            if opt_state is not None:
                opt.load_state_dict(opt_state)
            run.defense.load_optimizer_states(state.get("extra_optimizers", {}))
            if not isinstance(state.get("step"), int):
                raise QdefendError(f"{paths.checkpoints} latest checkpoint has no training step in its state.json: "
                                   "it was not written by `qdefend train`; retrain the run")
            start_epoch, step, best = state["epoch"], state["step"], state.get("best_val", -1.0)
            if cfg.train.epochs < start_epoch:
                raise QdefendError(f"--epochs {cfg.train.epochs} is fewer than the {start_epoch} epochs {paths.root} "
                                   f"has trained: pass --epochs {start_epoch} or more to continue it")
            if dist.main:
                self._reconcile_metrics(start_epoch, state.get("metrics") or {})
                if changed:
                    cfg.save(paths.config)
                    self._log({"event": "resume", "after_epoch": start_epoch, "changed": changed})
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in (changed or {}).items())
            self._say(f"resuming {paths.root} after epoch {start_epoch} (step {step})" + (f"; changed: {what}" if what else ""))
        elif dist.main:
            paths.root.mkdir(parents=True, exist_ok=True)
            cfg.save(paths.config)
            if paths.metrics.exists():
                paths.metrics.unlink()
            self._checkpoint(run, opt, 0, step, best, {}, is_best=False)
        if dist.enabled:
            self._say(f"{dist.world} processes ({dist.backend}), global batch {cfg.train.batch_size} "
                      f"({cfg.train.batch_size // dist.world}-{-(-cfg.train.batch_size // dist.world)} per process)")
        self._model = dist.wrap(SplitForward(net.encoder, net.head, run.release), device)

        steps_per_epoch = math.ceil(len(run.data.train) / cfg.train.batch_size)
        # the best checkpoint is picked among the epochs the defense has shaped (the last one at least)
        first = run.defense.first_defended_epoch
        if first > cfg.train.epochs and start_epoch < cfg.train.epochs:
            self._say(f"warning: defense '{cfg.defense.stack}' acts from epoch {first} but the run trains "
                      f"{cfg.train.epochs}: it has no effect; raise --epochs to at least {first}")
        first = min(first, cfg.train.epochs)
        if start_epoch == 0:  # before the first step (again after a kill in epoch 1: epoch-0 holds no hook state)
            net.eval()
            stats = run.defense.on_train_start(EpochContext(
                epoch=-1, encoder=net.encoder, head=net.head, data=run.data, epochs=cfg.train.epochs,
                features=lambda split: features(net.encoder, split, run, device=device)))
            dist.broadcast_state(run.defense.module())
            if stats and dist.main:
                self._log({"event": "train_start", **{f"hook_{k}": v for k, v in stats.items()}})
        last: dict[str, Any] = {}
        for epoch in range(start_epoch, cfg.train.epochs):
            last = self._epoch(run, opt, epoch, step, steps_per_epoch, device)
            step += steps_per_epoch
            if dist.main:
                score = last.get("val_acc_int8", last["val_acc"])
                is_best = epoch + 1 >= first and (score > best or cfg.train.select == "last")
                if is_best:
                    best = score
                self._checkpoint(run, opt, epoch + 1, step, best, last, is_best=is_best)
                self._log(last)
            # rank 0's state (bit for bit) on every rank (the defense's was broadcast after its hook);
            # also the others' wait for its evaluation
            dist.broadcast_state(net)
        # each rank's final state, hashed: rank 0 records them with the test accuracy (all equal, or a bug)
        digests = dist.digests(_state_tensors(run))
        if not dist.main:
            return {}
        return self._final_eval(device, {"rank_state_sha256": digests} if dist.enabled else {})

    def _epoch(self, run: Run, opt, epoch: int, step0: int, steps_per_epoch: int, device) -> dict:
        cfg, net, defense, dist = self.cfg, run.net, run.defense, self.dist
        torch.manual_seed(cfg.train.seed * 1000 + epoch + 7919 * dist.rank)
        gen = release_generator(cfg.train.seed, epoch + 1, device, dist.rank)
        norm = run.data.normalization
        net.train()
        for m in self._frozen:
            m.eval()
        t0 = time.perf_counter()
        tot_loss = tot_correct = seen = 0.0
        extra: dict[str, float] = {}
        it = batches(run.data.train, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed, epoch=epoch)
        bar = self._bar(f"epoch {epoch + 1}/{cfg.train.epochs}", steps_per_epoch)
        enc_params = [p for p in net.encoder.parameters() if p.requires_grad]
        trainable = [p for p in net.parameters() if p.requires_grad]
        max_loss = cfg.train.max_loss or MAX_LOSS_PER_NAT * math.log(max(2, run.data.num_classes))
        for i, (xb, yb) in enumerate(it):
            step = step0 + i
            n_global = len(yb)
            if n_global < dist.world:  # a last batch too small to share: every rank skips it
                continue
            share = dist.shard(n_global)
            xb, yb = xb[share], yb[share]
            weight = dist.loss_weight(len(yb), n_global)  # DDP's average becomes the global batch's mean
            for g in opt.param_groups:
                g["lr"] = self.lr_at(step, epoch, steps_per_epoch)
            x = torch.from_numpy(norm.apply(xb)).to(device)
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(yb).to(device)
            try:
                z, zr, logits = self._model(x, gen)
            except AssertionError as e:  # torchao's observers assert min <= max, which NaN fails
                if not run.quantized:
                    raise
                self._diverged(f"a fake-quant observer saw non-finite values ({e})", epoch, i)
            task = F.cross_entropy(logits, y)
            ctx = StepContext(x=x, y=y, z=z, z_released=zr, logits=logits, epoch=epoch, step=step,
                              encoder=net.encoder, head=net.head, normalization=norm, lr=opt.param_groups[0]["lr"])
            enc_terms = defense.encoder_loss_terms(ctx)
            terms = defense.loss_terms(ctx)
            loss = task + sum(terms.values(), torch.zeros((), device=device))
            sep = sum(enc_terms.values()) if enc_terms and enc_params else None
            # one decision for every rank: a rank that stopped alone would leave the others waiting
            bad_z, bad_sep, bad_loss, top = dist.max_([
                not bool(torch.isfinite(z).all()), sep is not None and not bool(torch.isfinite(sep).all()),
                not bool(torch.isfinite(loss).all()), task.item()])
            if bad_z:
                self._diverged("the encoder's output at the cut is not finite", epoch, i)
            if bad_sep or bad_loss:
                self._diverged(f"loss became {(sep if bad_sep and sep is not None else loss).item()}", epoch, i)
            if top > max_loss:
                self._diverged(f"the task loss reached {top:.3g}, above train.max_loss={max_loss:.3g} "
                               f"(a network at chance scores {math.log(run.data.num_classes):.2f})", epoch, i)
            opt.zero_grad(set_to_none=True)
            kept = None
            if sep is not None:
                kept = list(torch.autograd.grad(sep * weight, enc_params, retain_graph=True, allow_unused=True))
                dist.average_(kept)  # DDP reduces only what loss.backward() computes
            if not loss.requires_grad:
                raise QdefendError(
                    f"nothing to train: train.freeze={cfg.train.freeze} fixes the network and the defense stack "
                    f"'{cfg.defense.stack}' has no parameters of its own; freeze less, or use a learned defense (shredder)")
            (loss * weight if weight != 1.0 else loss).backward()
            if kept is not None:
                for p, g in zip(enc_params, kept):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
            opt.step()
            dist.sync_buffers(net)  # quantization ranges and BN statistics as one process would hold them
            dist.broadcast_new(defense.module())  # a defense module built at this step starts from rank 0's
            dist.sync_buffers(defense.module())  # e.g. the BatchNorm statistics of ARL's attacker
            if trainable and not all_finite(trainable):
                self._diverged("a weight became non-finite in the optimiser step", epoch, i)
            n = len(yb)
            tot_loss += task.item() * n
            tot_correct += float((logits.argmax(1) == y).sum())
            seen += n
            for k, v in {**terms, **enc_terms}.items():
                extra[k] = extra.get(k, 0.0) + v.item() * n
            if bar is not None:
                bar[0].update(bar[1], advance=1, description=f"epoch {epoch + 1}/{cfg.train.epochs} loss {tot_loss / seen:.3f}")
        if bar is not None:
            bar[0].stop()
        keys = sorted(extra)
        tot_loss, tot_correct, seen, *sums = dist.sum_([tot_loss, tot_correct, seen, *(extra[k] for k in keys)])
        extra = dict(zip(keys, sums))
        train_time = time.perf_counter() - t0
        bad = [k for part in (net.encoder, net.head) for k, v in part.state_dict().items() if not state_finite(k, v)]
        if bad:
            self._diverged(f"{bad[0]} (weights, BatchNorm statistics or quantization ranges) is not finite",
                           epoch, steps_per_epoch - 1)
        net.eval()
        hook_ctx = EpochContext(
            epoch=epoch, encoder=net.encoder, head=net.head, data=run.data, epochs=cfg.train.epochs,
            features=lambda split: features(net.encoder, split, run, device=device),
        )
        hook_stats = defense.on_epoch_end(hook_ctx)  # on every rank; rank 0's result is kept
        if dist.enabled:  # how far the ranks drifted apart on their own (0: bit for bit the same)
            dmod = defense.module()
            params = [p for p in net.parameters()]
            rec_spread = {"weights": dist.spread(params), "buffers": dist.spread(list(net.buffers())),
                          "defense": dist.spread(list(dmod.state_dict().values())) if dmod is not None else 0.0}
        dist.broadcast_state(defense.module())
        rec: dict[str, Any] = {
            "event": "epoch", "epoch": epoch + 1, "train_loss": tot_loss / seen, "train_acc": tot_correct / seen,
            "lr": opt.param_groups[0]["lr"], "train_time_s": round(train_time, 2), "steps": steps_per_epoch,
            **{f"train_{k}": v / seen for k, v in extra.items()}, **{f"hook_{k}": v for k, v in hook_stats.items()},
        }
        if dist.enabled:
            rec["processes"] = dist.world
            rec["rank_spread"] = rec_spread
        if not dist.main:  # rank 0 evaluates (the others wait for its state at the end of the epoch)
            return rec
        rec["val_acc"] = accuracy(net.encoder, net.head, run.data.val, run, device=device)
        if run.quantized:
            rec["val_acc_int8"] = accuracy(run.converted_encoder(), run.converted_head(), run.data.val, run, device=device)
        rec["time_s"] = round(time.perf_counter() - t0, 2)
        self._say(
            f"epoch {epoch + 1}: loss {rec['train_loss']:.4f}  train acc {rec['train_acc']:.4f}  val acc "
            + (f"fake-quant {rec['val_acc']:.4f} / int8 {rec['val_acc_int8']:.4f}" if run.quantized else f"{rec['val_acc']:.4f}")
            + f"  ({rec['time_s']:.0f}s)"
        )
        return rec

    def _final_eval(self, device, extra: dict | None = None) -> dict[str, Any]:
        """Test accuracy of the best checkpoint: fake-quant/float and converted int8."""

        run = load_run(self.paths.root, "best", data=self._data)
        run.net.to(device)
        rec: dict[str, Any] = {"event": "test", "checkpoint": run.state and f"epoch-{run.state['epoch']:04d}",
                               **(extra or {})}
        key = "test_acc_fakequant" if run.quantized else "test_acc_float"
        rec[key] = accuracy(run.net.encoder, run.net.head, run.data.test, run, device=device)
        if run.quantized:
            rec["test_acc_int8"] = accuracy(run.converted_encoder(), run.converted_head(), run.data.test, run, device=device)
        self._log(rec)
        return rec

    # -- helpers ----------------------------------------------------------------------------
    def _check_finite(self, loss: torch.Tensor, epoch: int, i: int) -> None:
        if not torch.isfinite(loss).all():
            self._diverged(f"loss became {loss.item()}", epoch, i)

    def _diverged(self, what: str, epoch: int, i: int) -> None:
        """Stop training: nothing of this epoch is saved, the last good checkpoint stays latest."""
        latest = resolve_tag(self.paths.checkpoints, "latest")
        lr = self.cfg.train.lr
        raise NonFiniteLossError(
            f"training diverged at epoch {epoch + 1}, batch {i}: {what}. Training stopped; the last good "
            f"checkpoint {self.paths.checkpoints / latest} is kept. Lower the learning rate or the defense "
            f"weights and continue: qdefend train --out {self.paths.root} --resume --set train.lr={lr / 10:g}"
        )

    def _reconcile_metrics(self, epoch: int, rec: dict) -> None:
        """Make metrics.jsonl agree with checkpoint ``epoch`` before training on: a line torn by a kill
        (or a line that is not a record) is dropped, and the checkpoint's own copy of its epoch line is written back when a kill came
        between the checkpoint and the line (the checkpoint and its line are one unit)."""
        records = self.paths.read_metrics(skip_bad=True)
        keep = [r for r in records if not (r.get("event") == "epoch" and r.get("epoch", 0) > epoch)]
        if epoch >= 1 and rec.get("epoch") == epoch and not any(
                r.get("event") == "epoch" and r.get("epoch") == epoch for r in keep):
            keep.append(rec)
            self._say(f"metrics.jsonl lacked epoch {epoch}'s line (interrupted after its checkpoint): restored")
        lines = self.paths.metrics.read_text(errors="replace").splitlines() if self.paths.metrics.is_file() else []
        if keep != records or len([x for x in lines if x.strip()]) != len(records):
            write_lines_atomic(self.paths.metrics, [json.dumps(r, sort_keys=True) for r in keep])

    def _checkpoint(self, run: Run, opt, epoch: int, step: int, best: float, rec: dict, *, is_best: bool) -> None:
        parts = {"encoder": run.net.encoder.state_dict(), "head": run.net.head.state_dict()}
        if run.net.wire is not None:
            parts["wire"] = run.net.wire.state_dict()
        mod = run.defense.module()
        if mod is not None:
            parts["defense"] = mod.state_dict()
        save_checkpoint(
            self.paths.checkpoints, epoch, parts, opt.state_dict(),
            {"step": step, "best_val": best, "metrics": rec},
            is_best=is_best, keep=self.cfg.train.keep_checkpoints, extra_optimizers=run.defense.optimizer_states(),
        )

    def _log(self, rec: dict) -> None:
        with open(self.paths.metrics, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()

    def _say(self, msg: str) -> None:
        if self.console is not None and self.dist.main:
            self.console.print(msg)

    def _bar(self, desc: str, total: int):
        if not self.progress or self.console is None or not self.dist.main:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                     console=self.console, transient=True)
        p.start()
        return p, p.add_task(desc, total=total)
