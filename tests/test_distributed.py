"""Training in several processes (qdefend.distributed, `qdefend train --nproc N`).

The collectives are checked in two real gloo processes on 127.0.0.1 against what one process
computes on the whole batch; the end-to-end checks (marked slow) train noise+cem with QAT through
`qdefend train --nproc 2` as a user runs it, compare it with one process, and kill -9 a worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qdefend import distributed
from qdefend.distributed import Dist, LaunchConfig
from qdefend.errors import QdefendError

ROOT = Path(__file__).resolve().parents[1]
QDEFEND = [sys.executable, "-m", "qdefend.cli"]


# ---------------------------------------------------------------------------------- no processes

@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 5, 64, 127, 128])
def test_shards_cover_each_batch_once(world, n):
    if n < world:
        return
    parts = [Dist(rank=r, world=world).shard(n) for r in range(world)]
    idx = [i for p in parts for i in range(n)[p]]
    assert idx == list(range(n))  # contiguous, in order, each sample once
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # the weights make DDP's average of the shares' mean losses the whole batch's mean loss
    loss = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ddp = sum(Dist(rank=r, world=world).loss_weight(len(loss[p]), n) * loss[p].mean() for r, p in enumerate(parts))
    assert float(ddp / world) == pytest.approx(float(loss.mean()), rel=1e-12)


def test_single_process_is_a_no_op():
    d = distributed.SINGLE
    assert not d.enabled and d.main and d.shard(10) == slice(0, 10) and d.loss_weight(3, 10) == 1.0
    t = torch.ones(3)
    d.average_([t])
    assert d.max_([1, 2]) == [1.0, 2.0] and d.sum_([1]) == [1.0] and d.agree([1.0]) and d.spread([t]) == 0.0
    assert len(d.digests([t])) == 1
    m = torch.nn.Linear(2, 2)
    assert d.wrap(m, torch.device("cpu")) is m


def test_launch_config_and_torchrun_args():
    one = LaunchConfig(nproc=2)
    assert "--standalone" in one.torchrun_args() and "--nproc-per-node=2" in one.torchrun_args()
    assert one.torchrun_args()[-2:] == ["-m", "qdefend.cli"]
    many = LaunchConfig(nproc=4, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500")
    args = many.torchrun_args()
    assert many.world == 8 and "--standalone" not in args
    assert {"--nnodes=2", "--node-rank=1", "--rdzv-backend=static", "--rdzv-endpoint=10.0.0.1:29500"} <= set(args)
    for bad, match in [(dict(nproc=0), "--nproc"), (dict(nnodes=2), "--rdzv-endpoint"),
                       (dict(nnodes=2, node_rank=2, rdzv_endpoint="h:1"), "--node-rank"),
                       (dict(nnodes=2, rdzv_endpoint="nohost"), "HOST:PORT"),
                       (dict(nnodes=2, rdzv_endpoint="h:99999"), "HOST:PORT")]:
        with pytest.raises(QdefendError, match=match):
            LaunchConfig(**bad)


@pytest.mark.parametrize("argv,match", [
    (["train", "--nproc", "0", "--out", "{tmp}/r"], "--nproc must be an integer >= 1"),
    (["train", "--nproc", "2", "--resume"], "--resume needs --out"),
    (["train", "--nproc", "2", "--out", "{tmp}/r", "--model", "nonet"], "nonet"),
    (["train", "--nproc", "2", "--nnodes", "2", "--out", "{tmp}/r"], "--rdzv-endpoint"),
    (["train", "--nproc", "2", "--out", "{tmp}/none", "--resume"], "no config at"),
    (["train", "--nproc", "2", "--out", "{tmp}/r", "--set", "train.bogus=1"], None),
])
def test_cli_errors_before_any_process_starts(tmp_path, argv, match):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    p = subprocess.run(QDEFEND + argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    if match:
        assert match in lines[0]


# ------------------------------------------------------------------------- two gloo processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_encoder():
    from qdefend import quant
    from qdefend.models import ModelConfig, build_model

    torch.manual_seed(0)
    net = build_model(ModelConfig(width=0.25, head_width=0.125), (1, 28, 28), 10)
    return quant.prepare_qat(net.encoder, torch.randn(2, 1, 28, 28))


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    d, _ = distributed.join("cpu")
    res: dict = {}
    try:
        # observers and BN: each rank sees its half; after sync_buffers, one process's state on all of it
        enc = _tiny_encoder()
        g = torch.Generator().manual_seed(1)
        x = torch.rand(16, 1, 28, 28, generator=g) * 4 - 1
        enc.train()
        enc(x[d.shard(16)])
        d.sync_buffers(enc)
        res["buffers"] = {k: v.tolist() for k, v in enc.state_dict().items() if v.is_floating_point()}
        res["spread_buffers"] = d.spread(list(enc.buffers()))
        # a defense's own optimizer averages its gradients before stepping
        lin = torch.nn.Linear(3, 1, bias=False)
        d.broadcast_state(lin)
        opt = d.attach(torch.optim.SGD(lin.parameters(), lr=1.0))
        lin(torch.full((1, 3), float(rank + 1))).sum().backward()  # grads: 1s on rank 0, 2s on rank 1
        w0 = lin.weight.detach().clone()
        opt.step()
        res["sgd_delta"] = (w0 - lin.weight.detach()).tolist()  # lr 1: the averaged gradient, 1.5
        t = torch.tensor([float(rank), 10.0 * rank])
        d.average_([t, None])
        res["average"] = t.tolist()
        res["max"], res["sum"] = d.max_([rank, -rank]), d.sum_([1, rank])
        res["agree_same"], res["agree_diff"] = d.agree([1.0, 2.0]), d.agree([float(rank)])
        res["agree_len"] = d.agree([1.0] * (rank + 1))
        # a lazily built module starts from rank 0's draw
        built = torch.nn.Module()
        d.broadcast_new(built, key="b")
        built.w = torch.nn.Parameter(torch.full((2,), float(rank)))
        d.broadcast_new(built, key="b")
        res["built"] = built.w.detach().tolist()
        res["digests"] = d.digests([built.w])
        res["spread_diff"] = d.spread([torch.tensor([float(rank), 0.0])])
    finally:
        distributed.leave()
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))


def test_collectives_in_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))

    # one process on the whole batch
    enc = _tiny_encoder()
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 4 - 1
    enc.train()
    enc(x)
    one = {k: v.tolist() for k, v in enc.state_dict().items() if v.is_floating_point()}
    assert r0["buffers"] == r1["buffers"] and r0["spread_buffers"] == 0.0
    # the input's observer sees the same values as one process: its min/max (hence scale) are exact
    # under MIN / MAX; deeper ones saw activations fake-quantized with each rank's own range during
    # the step, so they agree within a fraction of a step
    inputs = [k[: -len("min_val")] for k, v in one.items() if k.endswith("min_val") and v == float(x.min())]
    assert len(inputs) == 1
    for k, v in one.items():
        got = torch.tensor(r0["buffers"][k])
        if k.startswith(inputs[0]) and k.endswith(("min_val", "max_val")) or k.endswith(".scale") and \
                k.startswith(inputs[0].rsplit("activation_post_process.", 1)[0]):
            assert torch.equal(got, torch.tensor(v)), k
        elif k.endswith(("min_val", "max_val", ".scale")):
            assert torch.allclose(got, torch.tensor(v), rtol=2e-2, atol=1e-6), k
        elif k.endswith("running_mean"):  # the mean of equal shares' means (deeper stages saw activations
            # fake-quantized with each rank's own range during the step, hence the small tolerance)
            assert torch.allclose(got, torch.tensor(v), atol=1e-6 if k.startswith("stage1") else 2e-3), k
        elif k.endswith("running_var"):  # misses the spread between the shares' means only
            assert torch.allclose(got, torch.tensor(v), rtol=0.2, atol=1e-3), k
    assert r0["sgd_delta"] == r1["sgd_delta"] == [[1.5, 1.5, 1.5]]
    assert r0["average"] == r1["average"] == [0.5, 5.0]
    assert r0["max"] == [1.0, 0.0] and r0["sum"] == [2.0, 1.0]
    assert r0["agree_same"] and not r0["agree_diff"] and not r1["agree_len"]
    assert r0["built"] == r1["built"] == [0.0, 0.0]
    assert r0["digests"] == r1["digests"] and len(r0["digests"]) == 2
    assert r0["spread_diff"] == r1["spread_diff"] == 1.0


# ------------------------------------------------------------------ qdefend train --nproc 2

TINY = """
[data]
limit_train = {images}
limit_test = 512
val_size = 512
aux_size = 256
[model]
width = 0.25
head_width = 0.125
[train]
epochs = {epochs}
batch_size = 64
lr = 0.05
num_threads = 1
[defense]
stack = "noise+cem"
[defense.params.noise]
sigma = 0.1
"""


def _train(tmp_path, name, *extra, images=2048, epochs=2, timeout=600):
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(TINY.format(images=images, epochs=epochs))
    out = tmp_path / name
    p = subprocess.run(QDEFEND + ["train", "--config", str(cfg), "--out", str(out), "--quiet", *extra],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return out, p


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_two_processes_train_noise_cem_like_one(tmp_path):
    two, p2 = _train(tmp_path, "two", "--nproc", "2")
    assert p2.returncode == 0, p2.stderr[-2000:]
    one, p1 = _train(tmp_path, "one")
    assert p1.returncode == 0, p1.stderr[-2000:]
    r2, r1 = _records(two), _records(one)
    epochs2 = [r for r in r2 if r["event"] == "epoch"]
    assert [r["processes"] for r in epochs2] == [2, 2] and all(r["steps"] == 32 for r in epochs2)
    # the ranks stayed identical on their own (before rank 0's state is broadcast) and at the end
    for r in epochs2:
        assert r["rank_spread"] == {"weights": 0.0, "buffers": 0.0, "defense": 0.0}, r["rank_spread"]
        assert "hook_cem/var_mean" in r and "train_cem/loss" in r or r["epoch"] == 1
    test2, test1 = r2[-1], r1[-1]
    assert test2["event"] == "test" and len(set(test2["rank_state_sha256"])) == 1
    # same global batches, sharded: the same accuracy within 5 points on 512 test images
    # (BatchNorm normalises each process's half, CEM's statistics are per half, the noise differs)
    assert abs(test2["test_acc_int8"] - test1["test_acc_int8"]) <= 0.05, (test2, test1)
    assert test2["test_acc_int8"] > 0.5
    assert "nproc = 2" in (two / "config.toml").read_text() and "batch_size = 64" in (two / "config.toml").read_text()


def _worker_pids(out: Path) -> dict[int, int]:
    pids = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmd and b"qdefend.cli" in cmd:
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                pids[int(rank[0][5:])] = int(pid)
    return pids


@pytest.mark.slow
def test_kill_9_of_a_worker_stops_the_run_and_resume_finishes_it(tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text(TINY.format(images=2048, epochs=3))
    out = tmp_path / "k"
    proc = subprocess.Popen(QDEFEND + ["train", "--config", str(cfg), "--out", str(out), "--quiet", "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "epoch-0001").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first epoch"
            time.sleep(0.05)
        pids = _worker_pids(out)
        assert set(pids) == {0, 1}
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2
    last = [x for x in err.splitlines() if x.startswith("error:")][-1]
    assert "rank 1" in last and "SIGKILL" in last and "--resume" in last, err[-2000:]
    assert not (out / "checkpoints" / "epoch-0003").exists()
    assert not _worker_pids(out)  # no worker left behind
    # continue with another process count: the global batch and the schedule go on where they were
    p = subprocess.run(QDEFEND + ["train", "--out", str(out), "--resume", "--quiet", "--nproc", "2"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = _records(out)
    assert [r["epoch"] for r in recs if r["event"] == "epoch"] == [1, 2, 3] or \
        [r["epoch"] for r in recs if r["event"] == "epoch"][-1] == 3
    assert recs[-1]["event"] == "test" and recs[-1]["checkpoint"] == "epoch-0003"
    assert len(set(recs[-1]["rank_state_sha256"])) == 1
    p = subprocess.run(QDEFEND + ["train", "--out", str(out), "--resume", "--quiet", "--epochs", "4"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    resumes = [r for r in _records(out) if r["event"] == "resume"]
    assert resumes[-1]["changed"]["train.nproc"] == [2, 1]


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["noise+arl", "noise+cem-slot", "vib-mask", "patrol"])
def test_every_defense_keeps_the_ranks_identical(tmp_path, stack):
    """Epoch hooks (cem-slot's slots, the vib-mask mask, patrol's pruning), a defense's own optimizer
    and its BatchNorm statistics (ARL's attacker): no drift between the two processes."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(TINY.format(images=512, epochs=2).replace('stack = "noise+cem"', f'stack = "{stack}"')
                   .replace("[defense.params.noise]\nsigma = 0.1\n", "[defense.params.noise]\nsigma = 0.1\n"
                            if stack.startswith("noise") else ""))
    out = tmp_path / "r"
    p = subprocess.run(QDEFEND + ["train", "--config", str(cfg), "--out", str(out), "--quiet", "--nproc", "2"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = _records(out)
    for r in recs[:-1]:
        assert r["rank_spread"] == {"weights": 0.0, "buffers": 0.0, "defense": 0.0}, (r["epoch"], r["rank_spread"])
    assert len(set(recs[-1]["rank_state_sha256"])) == 1


@pytest.mark.slow
def test_a_4_bit_per_channel_wire_keeps_the_ranks_identical(tmp_path):
    """The wire quantizer's observed range (min_val/max_val per channel) is reduced like an
    observer's, so the processes hold one grid and export writes it."""
    cfg = tmp_path / "w.toml"
    cfg.write_text(TINY.format(images=512, epochs=1).replace('stack = "noise+cem"', 'stack = "noise"')
                   + '[quant]\nwire_bits = 4\nwire_granularity = "channel"\n')
    out = tmp_path / "r"
    p = subprocess.run(QDEFEND + ["train", "--config", str(cfg), "--out", str(out), "--quiet", "--nproc", "2"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = _records(out)
    assert recs[0]["rank_spread"] == {"weights": 0.0, "buffers": 0.0, "defense": 0.0}, recs[0]["rank_spread"]
    assert len(set(recs[-1]["rank_state_sha256"])) == 1
    from qdefend.run import load_run

    grid = load_run(out).wire_grid()
    assert grid["bits"] == 4 and len(grid["scale"]) == 8
