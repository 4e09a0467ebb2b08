"""Training in several processes with PyTorch's own engine: torch.distributed under torchrun.

``qdefend train --nproc N`` starts N copies of the same ``qdefend train`` command through
``torch.distributed.run`` (the torchrun / elastic launcher: ``--standalone`` on one machine, the
static rendezvous at ``--rdzv-endpoint`` across ``--nnodes`` machines). Each copy finds the
launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``), joins
the process group (gloo on CPU, NCCL on CUDA) and trains its share of every batch under
:class:`~torch.nn.parallel.DistributedDataParallel`. ``torchrun -m qdefend.cli train ...`` works
the same way.

What stays one run whatever N is (:class:`Dist` does each):

* **The batch.** ``train.batch_size`` is the global batch: every rank walks the same seeded
  order and takes its contiguous share of each batch (:meth:`Dist.shard`), so N processes see
  exactly the batches one process sees. Each rank's loss is weighted by its share
  (:meth:`Dist.loss_weight`), so DDP's gradient average is the gradient of the global batch's mean.
* **Quantization ranges and BatchNorm statistics** (:meth:`Dist.sync_buffers`, after every step).
  Every rank's moving-average min/max observer takes one step from the same state, and that step
  is monotone in the batch's min (max), so the MIN (MAX) over ranks is exactly the state one
  process would hold after the global batch; fake-quant scales are then recomputed from it.
  BatchNorm running means and variances are averaged (the mean is exact for equal shares; the
  variance misses the spread between the shares' means). Normalisation itself uses each rank's
  own share, as DDP does without SyncBatchNorm (which the exported pt2e graph cannot take).
* **Gradients that DDP does not see**: CEM's encoder-only gradient (taken with
  ``torch.autograd.grad``) is averaged by :meth:`Dist.average_`, and a defense's own optimizer
  (ARL's attacker, Shredder's noise, cem-slot's slots, the VIB variance) averages its gradients
  before each step (:meth:`Dist.attach`).
* **Epoch hooks and lazily built defense modules**: every rank runs the hook, then rank 0's
  result is broadcast (:meth:`Dist.broadcast_state`), so all ranks hold rank 0's state bit for bit.
* **Files**: rank 0 alone writes checkpoints, metrics and the config, and evaluates.

A rank that dies (or raises) ends the whole run: the elastic agent stops the other workers, and
``qdefend train`` says which rank failed and how to ``--resume`` from the last checkpoint, with
the same or another N.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from .errors import QdefendError

__all__ = ["Dist", "SINGLE", "current", "join", "launched", "launch", "LaunchConfig"]

WORKER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "QDEFEND_DIST_TIMEOUT_S"  # how long a rank waits in a collective (rank 0 evaluating: default 1 h)


def launched() -> bool:
    """Whether this process is a worker started by torchrun (or ``qdefend train --nproc``)."""
    return all(k in os.environ for k in WORKER_ENV)


@dataclass
class Dist:
    """This process's place in the process group; the default is one process, where every method
    is a no-op, so the trainer has one code path."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    _built: dict = field(default_factory=dict, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- the batch --------------------------------------------------------------------------
    def shard(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of ``n`` samples (sizes differ by <= 1)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def loss_weight(self, n_local: int, n_global: int) -> float:
        """The factor on this rank's mean loss that makes DDP's average the global batch's mean."""
        return self.world * n_local / n_global if self.enabled else 1.0

    # -- collectives ------------------------------------------------------------------------
    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` under DistributedDataParallel (rank 0's weights and buffers broadcast to all);
        the module itself when one process trains or nothing in it needs a gradient."""
        if not self.enabled or not any(p.requires_grad for p in module.parameters()):
            if self.enabled:
                self.broadcast_state(module)
            return module
        from torch.nn.parallel import DistributedDataParallel

        import warnings

        # a 1-input-channel conv's weight is both contiguous and channels_last: DDP's bucket view and
        # the gradient pick different (equivalent) strides and it warns on every step
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        ids = [device.index] if device.type == "cuda" else None
        # buffers are synchronised by sync_buffers (min/max, mean), not overwritten by rank 0's
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def _reduce(self, values: Iterable[float], op) -> list[float]:
        values = [float(v) for v in values]
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        torch.distributed.all_reduce(t, op=op)
        return t.tolist()

    def max_(self, values: Iterable[float]) -> list[float]:
        """The element-wise maximum over ranks (every rank gets the same answer: one collective)."""
        return self._reduce(values, torch.distributed.ReduceOp.MAX)

    def sum_(self, values: Iterable[float]) -> list[float]:
        """The element-wise sum over ranks."""
        return self._reduce(values, torch.distributed.ReduceOp.SUM)

    @staticmethod
    def _flat(tensors: list[torch.Tensor], collective, dtype: torch.dtype | None = None) -> None:
        """One collective over ``tensors`` laid end to end (``collective(flat)`` works in place),
        then each tensor takes its part back."""
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1).to(dtype or t.dtype) for t in tensors])
            collective(flat)
            i = 0
            for t in tensors:
                t.copy_(flat[i:i + t.numel()].view_as(t).to(t.dtype))
                i += t.numel()

    def average_(self, tensors: list[torch.Tensor | None]) -> None:
        """Average tensors over ranks in place (one collective for all; None entries skipped)."""
        ts = [t for t in tensors if t is not None]
        if not self.enabled or not ts:
            return

        def mean(flat):
            torch.distributed.all_reduce(flat)
            flat /= self.world

        self._flat(ts, mean, torch.float32)

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Make ``optimizer`` (a defense's own) average its gradients over ranks before each step."""
        if self.enabled:
            def average_grads(opt, args, kwargs):
                self.average_([p.grad for g in opt.param_groups for p in g["params"]])

            optimizer.register_step_pre_hook(average_grads)
        return optimizer

    def sync_buffers(self, module: nn.Module | None) -> None:
        """Quantization ranges and BatchNorm statistics as one process would hold them (module doc):
        observers' min_val by MIN, max_val by MAX, BN running mean/var averaged, fake-quant scale
        and zero point recomputed from the synchronised observers. Three collectives."""
        if not self.enabled or module is None:
            return
        groups: dict[str, list[torch.Tensor]] = {"min": [], "max": [], "avg": []}
        for name, b in module.named_buffers():
            if not b.is_floating_point() or b.numel() == 0:
                continue
            leaf = name.rsplit(".", 1)[-1]
            kind = {"min_val": "min", "max_val": "max", "running_mean": "avg", "running_var": "avg"}.get(leaf)
            if kind:
                groups[kind].append(b)
        ops = {"min": torch.distributed.ReduceOp.MIN, "max": torch.distributed.ReduceOp.MAX,
               "avg": torch.distributed.ReduceOp.SUM}
        for kind, bufs in groups.items():
            if not bufs:
                continue

            def reduce(flat, kind=kind):
                torch.distributed.all_reduce(flat, op=ops[kind])
                if kind == "avg":
                    flat /= self.world

            self._flat(bufs, reduce)
        for m in module.modules():
            recompute_qparams(m)

    def broadcast_state(self, module: nn.Module | None) -> None:
        """Rank 0's parameters and buffers to every rank, one collective per dtype; refused (rather
        than scrambled) when the ranks' tensors differ in size."""
        if not self.enabled or module is None:
            return
        tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.numel()]
        sizes = [float(t.numel()) for t in tensors]
        if not self.agree([len(sizes), *sizes] if sizes else [0]):
            raise QdefendError(f"{type(module).__name__} holds tensors of different sizes on different ranks; "
                               "train this configuration with one process (drop --nproc) and report it")
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            self._flat(ts, lambda flat: torch.distributed.broadcast(flat, src=0))

    def broadcast_new(self, module: nn.Module | None, key: str = "defense") -> None:
        """Broadcast ``module`` from rank 0 when any rank's set of tensors changed since the last
        call: a defense that builds its parameters at its first batch (ARL's attacker, Shredder's
        noise) then starts from rank 0's draw on every rank. One small collective a call."""
        if not self.enabled or module is None:
            return
        sig = tuple((n, tuple(t.shape)) for n, t in module.state_dict().items())
        if self.max_([self._built.get(key) != sig])[0]:
            self.broadcast_state(module)
            self._built[key] = sig

    def agree(self, values: list[float]) -> bool:
        """Whether every rank holds the same ``values`` (same length on every rank is the caller's
        part: pad with a leading count, as broadcast_state does)."""
        if not self.enabled:
            return True
        n = int(self.max_([len(values)])[0])
        v = list(values) + [math.nan] * (n - len(values))
        both = self.max_([*(x if x == x else -1e300 for x in v), *(-x if x == x else -1e300 for x in v),
                          float(len(values) != n)])
        return not both[-1] and all(a == -b for a, b in zip(both[:n], both[n:2 * n]))

    def spread(self, tensors: list[torch.Tensor]) -> float:
        """The largest difference between ranks over every element of ``tensors`` (0.0: the ranks
        agree bit for bit); one collective. How far training drifts before rank 0's state is broadcast."""
        ts = [t.detach().reshape(-1).double() for t in tensors if t.numel() and t.is_floating_point()]
        if not self.enabled or not ts:
            return 0.0
        flat = torch.cat(ts).to(self._device())
        both = torch.cat([flat, -flat])
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        n = flat.numel()
        return float((both[:n] + both[n:]).max())

    def digests(self, tensors: list[torch.Tensor]) -> list[str]:
        """Every rank's sha256 over the bytes of ``tensors`` (in rank order; one entry outside torchrun)."""
        import hashlib

        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.numel() else b"")
        if not self.enabled:
            return [h.hexdigest()]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, h.hexdigest())
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


SINGLE = Dist()
_current: Dist = SINGLE


def current() -> Dist:
    """The process group this process trains in (:data:`SINGLE` outside torchrun)."""
    return _current


def recompute_qparams(m: nn.Module) -> None:
    """A fake-quant module's scale / zero point from its observer's present min/max (what its
    next forward would compute before quantizing), so the buffers agree across ranks."""
    obs = getattr(m, "activation_post_process", None)
    if obs is None or not hasattr(m, "calculate_qparams") or not hasattr(m, "scale"):
        return
    mn = getattr(obs, "min_val", None)
    if mn is None or mn.numel() == 0 or not bool(torch.isfinite(mn).all()):
        return
    scale, zp = m.calculate_qparams()
    with torch.no_grad():
        if m.scale.shape != scale.shape:
            m.scale.resize_(scale.shape)
            m.zero_point.resize_(zp.shape)
        m.scale.copy_(scale)
        m.zero_point.copy_(zp)


def join(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun described in the environment (gloo on CPU, NCCL on CUDA);
    outside torchrun: one process on ``device_name``."""
    global _current
    if not launched():
        return SINGLE, torch.device(device_name)
    import torch.distributed as td

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device_name == "cuda":
        if not torch.cuda.is_available():
            raise QdefendError("--device cuda asked for, but this torch build sees no CUDA GPU: use --device cpu")
        if local >= torch.cuda.device_count():
            raise QdefendError(f"--nproc asks for GPU {local} but this machine has {torch.cuda.device_count()}: "
                               f"use --nproc {torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 3600)))
    if not td.is_initialized():
        td.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    _current = Dist(rank=rank, world=world, local_rank=local, backend=backend)
    return _current, device


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` came out of a torch.distributed collective (a peer that died or hung)."""
    import traceback

    if isinstance(e, getattr(torch.distributed, "DistError", ())):
        return True
    if not isinstance(e, RuntimeError):
        return False
    text = str(e)  # DDP's reducer fails inside autograd's C++ engine, so no Python frame of torch.distributed
    return any(k in text for k in ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer",
                                   "Broken pipe")) or any(
        "torch/distributed/" in fr.filename.replace("\\", "/") for fr in traceback.extract_tb(e.__traceback__))


def leave() -> None:
    """Leave the process group (end of training)."""
    global _current
    if _current.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _current = SINGLE


# ------------------------------------------------------------------------------------ launcher


@dataclass
class LaunchConfig:
    """``qdefend train --nproc N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]``."""

    nproc: int = 1  # processes on this machine (one per GPU with --device cuda)
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT of node 0, reachable by every node (several machines)
    threads: int = 0  # torch threads per process (0: this machine's cores / nproc); train.num_threads checks it

    def __post_init__(self):
        from .checks import check_number

        check_number(self.nproc, "--nproc", lo=1, integer=True, fix="--nproc 2")
        check_number(self.nnodes, "--nnodes", lo=1, integer=True, fix="--nnodes 2")
        check_number(self.node_rank, "--node-rank", lo=0, hi=self.nnodes - 1, integer=True,
                     fix="--node-rank 0 on the first machine, 1 on the next, ...")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise QdefendError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address, the same on every node)")
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise QdefendError(f"--rdzv-endpoint {self.rdzv_endpoint!r}: give HOST:PORT, e.g. 10.0.0.1:29500")

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    def torchrun_args(self) -> list[str]:
        """torchrun's own arguments, running ``python -m qdefend.cli`` N times (the workers' arguments
        are set after parsing, so torchrun never reads them as its own options)."""
        args = [f"--nproc-per-node={self.nproc}", "--max-restarts=0", "--monitor-interval=0.2"]
        if self.nnodes == 1 and not self.rdzv_endpoint:
            args.append("--standalone")
        else:
            args += [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", "--rdzv-backend=static",
                     f"--rdzv-endpoint={self.rdzv_endpoint}"]
        return args + ["-m", "qdefend.cli"]


def launch(cfg: LaunchConfig, worker_argv: list[str], *, run_dir: str | None = None) -> None:
    """Run ``qdefend WORKER_ARGV`` in ``cfg.nproc`` processes under torchrun and wait; a worker
    that fails (an error, a signal, a kill -9) stops them all and raises one QdefendError naming
    it and how to resume."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # torchrun would force 1 and warn
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    args = get_args_parser().parse_args(cfg.torchrun_args())
    args.training_script_args = list(worker_argv)
    try:
        run(args)
    except ChildFailedError as e:
        raise QdefendError(_failure_line(e, cfg, run_dir)) from None


def _failure_line(e, cfg: LaunchConfig, run_dir: str | None) -> str:
    import signal

    # the cause, not the workers the agent then ended with SIGTERM: the earliest other failure first
    rank, f = min(e.failures.items(), key=lambda kv: (kv[1].exitcode == -signal.SIGTERM, kv[1].timestamp, kv[0]))
    code = f.exitcode
    if code is not None and code < 0:
        try:
            what = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            what = f"was killed by signal {-code}"
    else:
        what = f"exited with status {code}" + (" (its error is printed above)" if code in (2, 3) else "")
    again = f"qdefend train --out {run_dir} --resume --nproc {cfg.nproc}" if run_dir else "qdefend train --resume"
    return (f"training worker rank {rank} (pid {f.pid}) {what}, so the distributed run stopped and the other "
            f"workers were ended; the last finished epoch is checkpointed: continue with `{again}` "
            "(any --nproc, the global batch is kept)")
