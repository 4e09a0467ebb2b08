"""CEM: conditional entropy maximisation of the released features, as the public CEM code computes it.

Gaussian noise on z (the ``noise`` defense) makes every class a Gaussian mixture whose entropy
H(x|z~), and with it the MSE floor of any inversion attacker, rises when the spread of each mixture
component is small next to the noise. CEM therefore keeps per-class cluster statistics of the
encoder's features (k-means, or a diagonal Gaussian mixture) refreshed after every epoch, and pushes
each cluster's variance under the noise floor tau * sigma^2 with a log hinge on the current batch:

    v_ck = rho * vhat_ck + (1 - rho) * vbar_ck,   rho = min(0.99, 10 * n_batch_ck / (w_ck * N_c))
    L_C  = mean over classes c in the batch of  sum_k w_ck * relu(log(v_ck + g) - log(tau sigma^2 + g))

The term is returned by ``encoder_loss_terms``: the trainer takes its gradient w.r.t. the encoder
alone, keeps it, and adds it after the task backward, so it never reaches the cloud head. Its weight
follows the code's schedule: lambda * 0.001 / lr while lr >= 4.1e-4, lambda below, from epoch 2.
CEM releases nothing itself; the noise defense in the same stack (``noise+cem``) does, and CEM
reads that sigma as its noise floor.

Paper: Xia et al., "Theoretical Insights in Model Inversion Robustness and Conditional Entropy
Maximization for Collaborative Inference Systems", CVPR 2025 (arXiv 2503.00383); code:
github.com/xiasong0501/CEM (the loss, the noise floor and the surrogate's update schedule follow it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


import torch
from torch import nn

from ..checks import check_choice, check_number
from ..errors import QdefendError
from .base import Defense, EpochContext, StepContext

SURROGATES = ("kmeans", "gmm")
SCHEDULES = ("lr", "constant", "finetune")


def _fail(msg: str, fix: str) -> None:
    raise QdefendError(f"cem {msg}: {fix}")


@dataclass
class CEMConfig:
    lam: float = 16.0  # lambda, the CEM weight (paper: 0, 8, 16); 0 turns the term off
    sigma: float = 0.0  # noise floor sigma; 0 = read it from the noise defense of the stack
    clusters: int = 5  # K, clusters (mixture components) per class
    surrogate: str = "kmeans"  # kmeans (the code's default) | gmm (diagonal Gaussian mixture)
    tau: float = 0.125  # floor = tau * sigma^2 (0.0625 on TinyImageNet)
    log_offset: float = 0.01  # g in log(v + g)
    rho_scale: float = 10.0  # rho = min(rho_max, rho_scale * n_batch_ck / (w_ck * N_c))
    rho_max: float = 0.99
    # lr: lambda * lr_ref / lr while lr >= lr_floor (the code's long schedule) | constant | finetune: the
    # code's pretrain route, a trained run (--from) fine-tuned at full lambda from the first step, the
    # statistics fitted on it before training
    schedule: str = "lr"
    lr_ref: float = 0.001
    lr_floor: float = 4.1e-4
    start_epoch: int = 2  # 1-based; statistics exist from the end of epoch 1
    ramp_epochs: int = 0  # > 0: extra linear warm-up of lambda over this many epochs
    kmeans_iters: int = 50
    warm_start: bool = True  # k-means++ at the first fit, previous centroids afterwards
    gmm_iters: int = 10  # EM iterations of the gmm surrogate, initialised from k-means
    gmm_reg: float = 1e-6  # added to every GMM variance
    max_samples: int = 0  # statistics from the first N training samples (0 = the whole split)
    seed: int = 0

    def __post_init__(self):
        p = "defense.params.cem"
        check_number(self.lam, f"{p}.lam (lambda)", lo=0, fix=f"--set {p}.lam=16")
        check_number(self.sigma, f"{p}.sigma", lo=0,
                     fix="leave it 0 to use the noise sigma, e.g. --defense noise+cem --sigma 0.1")
        self.clusters = check_number(self.clusters, f"{p}.clusters", lo=1, integer=True, example=5)
        check_choice(self.surrogate, f"{p}.surrogate", SURROGATES)
        check_choice(self.schedule, f"{p}.schedule", SCHEDULES)
        for name in ("tau", "log_offset", "rho_scale", "lr_ref", "gmm_reg"):
            check_number(getattr(self, name), f"{p}.{name}", lo=0, lo_open=True, example=getattr(CEMConfig, name))
        check_number(self.rho_max, f"{p}.rho_max", lo=0, hi=1, lo_open=True, example=0.99)
        check_number(self.lr_floor, f"{p}.lr_floor", lo=0, example=0.00041)
        self.start_epoch = check_number(self.start_epoch, f"{p}.start_epoch (statistics exist after epoch 1)", lo=2,
                                        integer=True, fix=f"--set {p}.start_epoch=2")
        for name, lo in (("ramp_epochs", 0), ("kmeans_iters", 1), ("gmm_iters", 1), ("max_samples", 0)):
            setattr(self, name, check_number(getattr(self, name), f"{p}.{name}", lo=lo, integer=True,
                                             example=getattr(CEMConfig, name)))


# -- cluster statistics -----------------------------------------------------------------------

def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to its distance."""
    idx = [int(torch.randint(len(x), (1,), generator=generator))]
    for _ in range(1, k):
        d = torch.cdist(x, x[idx]).min(1).values.cpu().double()
        p = d / d.sum() if d.sum() > 0 else torch.full_like(d, 1.0 / len(d))
        idx.append(int(torch.multinomial(p, 1, generator=generator)))
    return x[idx].clone()


def kmeans(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations from ``init`` (K x D) on x (N x D); an emptied cluster keeps its centre."""
    c = init.clone()
    labels = None
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        n = torch.bincount(labels, minlength=len(c)).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        c = torch.where(n[:, None] > 0, sums / n.clamp(min=1)[:, None], c)
    return c, torch.cdist(x, c).argmin(1)


def fit_diag_gmm(x: torch.Tensor, means: torch.Tensor, var: torch.Tensor, weights: torch.Tensor,
                 iters: int, reg: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EM for a diagonal-covariance Gaussian mixture; returns (means K x D, variances K x D, weights K)."""
    x64, mu, v, w = x.double(), means.double(), var.double() + reg, weights.double()
    for _ in range(iters):
        logp = _diag_log_prob(x64, mu, v) + torch.log(w.clamp(min=1e-300))
        r = torch.softmax(logp, 1)  # N x K responsibilities
        nk = r.sum(0)
        keep = nk > 1e-8  # a component that lost all mass keeps its parameters, weight 0
        safe = nk.clamp(min=1e-8)[:, None]
        new_mu = r.T @ x64 / safe
        new_v = (r.T @ x64.square()) / safe - new_mu.square()
        mu = torch.where(keep[:, None], new_mu, mu)
        v = torch.where(keep[:, None], new_v.clamp(min=0) + reg, v)
        w = nk / nk.sum()
    return mu.to(x.dtype), v.to(x.dtype), w.to(x.dtype)


def _diag_log_prob(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x_n; mu_k, diag var_k) for every (n, k)."""
    d2 = ((x[:, None, :] - mu[None]).square() / var[None]).sum(-1)
    return -0.5 * (d2 + torch.log(var).sum(-1)[None] + x.shape[1] * math.log(2 * math.pi))


class CEMStats(nn.Module):
    """Per-class cluster statistics, as buffers so that checkpoints and ``--resume`` keep them.

    centroids C x K x D, weights C x K (w_ck = n_ck / N_c, 0 = no such cluster), vbar C x K (mean over
    samples and dims of (z - mu_ck)^2), class_count C (N_c), and for the gmm surrogate var C x K x D.
    Empty until the first fit; loading a checkpoint takes the stored shapes.
    """

    NAMES = ("centroids", "weights", "vbar", "class_count", "var")

    def __init__(self):
        super().__init__()
        for n in self.NAMES:
            self.register_buffer(n, torch.zeros(0))

    @property
    def fitted(self) -> bool:
        return self.centroids.numel() > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for n in self.NAMES:
            t = state_dict.get(prefix + n)
            if t is not None:
                self._buffers[n] = torch.empty(t.shape, dtype=t.dtype, device=self._buffers[n].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def log_hinge(v: torch.Tensor, floor: float, g: float) -> torch.Tensor:
    """relu(log(v + g) - log(floor + g)): zero when the variance v is under the noise floor."""
    return torch.relu(torch.log(v + g) - math.log(floor + g))


# -- the defense ---------------------------------------------------------------------------------

class CEM(Defense):
    """Conditional entropy maximisation: cluster variances of z pushed under the noise floor."""

    name = "cem"
    Config = CEMConfig

    def __init__(self, config: CEMConfig | None = None):
        super().__init__(config)
        self.stats = CEMStats()
        self._stack_sigma: float | None = None

    @property
    def first_defended_epoch(self) -> int:
        """The term acts from ``start_epoch``."""
        return self.acts_from if self.config.lam > 0 else 1

    @property
    def needs_trained_network(self) -> str | None:
        if self.config.schedule == "finetune" and self.config.lam > 0:
            return f"{self.name} schedule 'finetune' fine-tunes a trained run at full lambda from the first step"
        return None

    @property
    def acts_from(self) -> int:
        """The first (1-based) epoch with the term: 1 for a fine-tune, else ``start_epoch``."""
        return 1 if self.config.schedule == "finetune" else self.config.start_epoch

    # -- the noise floor ---------------------------------------------------------------------
    def bind_stack(self, defenses: list[Defense]) -> None:
        """Read sigma from the Gaussian noise released by the other defenses of the stack."""
        sig2 = sum(s["sigma"] ** 2 for d in defenses if d is not self
                   if (s := d.release_spec()) is not None and s.get("type") == "gaussian_noise")
        self._stack_sigma = math.sqrt(sig2)
        own = self.config.sigma
        if own > 0 and self._stack_sigma > 0 and not math.isclose(own, self._stack_sigma, rel_tol=1e-6):
            _fail(f"sigma {own} differs from the noise sigma {self._stack_sigma:g} of the stack",
                  "drop defense.params.cem.sigma (cem reads the noise sigma)")
        if self.config.lam > 0 and self._stack_sigma == 0:
            _fail("needs Gaussian noise with sigma > 0 in the same stack",
                  "add noise, e.g. --defense noise+cem --sigma 0.1")

    @property
    def sigma(self) -> float:
        """The noise sigma of the floor: the stack's (after ``bind_stack``) or the config's."""
        if self._stack_sigma:
            return self._stack_sigma
        if self.config.sigma > 0:
            return self.config.sigma
        _fail("has no noise sigma (it was not built in a stack with noise)",
              "add noise, e.g. --defense noise+cem --sigma 0.1, or set --set defense.params.cem.sigma=0.1")

    @property
    def floor(self) -> float:
        return self.config.tau * self.sigma ** 2

    # -- lambda schedule ---------------------------------------------------------------------
    def lambda_at(self, epoch: int, lr: float | None) -> float:
        """Effective weight in 0-based ``epoch`` at learning rate ``lr`` (the code's lr coupling)."""
        c = self.config
        if c.lam == 0:
            return 0.0
        if c.schedule == "lr" and lr is None:  # checked from the first step, not only from epoch 2
            _fail("schedule 'lr' needs the learning rate, which this trainer does not pass",
                  "use --set defense.params.cem.schedule=constant")
        e1 = epoch + 1
        if e1 < self.acts_from:
            return 0.0
        lam = c.lam
        if c.ramp_epochs:
            lam *= min(1.0, (e1 - self.acts_from + 1) / c.ramp_epochs)
        if c.schedule == "lr" and lr >= c.lr_floor:
            lam *= c.lr_ref / lr
        return lam

    # -- statistics ----------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, z: torch.Tensor, y: torch.Tensor, num_classes: int,
            class_count: torch.Tensor | None = None, *, epoch: int = 0) -> dict[str, float]:
        """Refit the per-class statistics on noise-free features ``z`` (N x ...) with labels ``y``.

        ``class_count`` (N_c for rho) defaults to the label counts of ``y``; pass the full split's
        counts when ``z`` is a subsample of it.
        """
        c = self.config
        x = z.detach().reshape(len(z), -1).float()
        y = y.to(x.device)
        K, D = c.clusters, x.shape[1]
        prev = self.stats.centroids if (c.warm_start and self.stats.fitted
                                        and self.stats.centroids.shape == (num_classes, K, D)) else None
        prev_w = self.stats.weights if prev is not None else None
        gen = torch.Generator().manual_seed(c.seed * 100_003 + epoch)
        cent = torch.zeros(num_classes, K, D, device=x.device)
        w = torch.zeros(num_classes, K, device=x.device)
        vbar = torch.zeros(num_classes, K, device=x.device)
        var = torch.zeros((num_classes, K, D) if c.surrogate == "gmm" else (0,), device=x.device)
        for cls in range(num_classes):
            xc = x[y == cls]
            if len(xc) == 0:
                continue
            init = prev[cls] if prev is not None and bool((prev_w[cls] > 0).any()) else kmeans_pp(xc, K, gen)
            mu, lab = kmeans(xc, init.to(x.device), c.kmeans_iters)
            n = torch.bincount(lab, minlength=K).float()
            sq = ((xc - mu[lab]).square()).mean(1)
            vk = torch.zeros(K, device=x.device).index_add_(0, lab, sq) / n.clamp(min=1)
            wk = n / len(xc)
            if c.surrogate == "gmm":
                dvar = torch.zeros(K, D, device=x.device).index_add_(0, lab, (xc - mu[lab]).square())
                dvar = dvar / n.clamp(min=1)[:, None]
                mu, dv, wk = fit_diag_gmm(xc, mu, dvar, wk, c.gmm_iters, c.gmm_reg)
                var[cls], vk = dv, dv.mean(1)
            cent[cls], w[cls], vbar[cls] = mu, wk, vk
        if class_count is None:
            class_count = torch.bincount(y, minlength=num_classes)
        s = self.stats
        s.centroids, s.weights, s.vbar, s.var = cent, w, vbar, var
        s.class_count = class_count.to(x.device).float()
        return self.describe()

    def describe(self) -> dict[str, float]:
        """Epoch diagnostics: clusters, mean variance, share above the floor, hinge on the stats."""
        s = self.stats
        valid = s.weights > 0
        out = {"clusters": float(valid.sum()), "var_mean": float(s.vbar[valid].mean()) if valid.any() else 0.0}
        if self.config.sigma > 0 or self._stack_sigma:
            g = self.config.log_offset
            out["above_floor"] = float((s.vbar[valid] > self.floor).float().mean()) if valid.any() else 0.0
            per_class = (s.weights * log_hinge(s.vbar, self.floor, g)).sum(1)
            has = valid.any(1)
            out["hinge"] = float(per_class[has].mean()) if has.any() else 0.0
        return out

    def hinge(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """L_C of a batch (differentiable in z); None when no class of the batch has statistics."""
        s, c = self.stats, self.config
        if not s.fitted:
            return None
        x = z.reshape(len(z), -1)
        C, K, _ = s.centroids.shape
        valid = s.weights > 0
        has = valid[y]  # B x K
        present = torch.unique(y[has.any(1)])
        if len(present) == 0:
            return None
        mu_b = s.centroids[y]  # B x K x D
        xd = x.detach()
        if c.surrogate == "gmm":
            score = -(_diag_log_prob_batched(xd, mu_b, s.var[y]) + torch.log(s.weights[y].clamp(min=1e-30)))
        else:
            score = (xd[:, None, :] - mu_b).square().sum(-1)
        a = score.masked_fill(~has, float("inf")).argmin(1)
        ok = has.any(1)
        idx = ok.nonzero().squeeze(1)
        cell = y[idx] * K + a[idx]
        sq = (x[idx] - mu_b[idx, a[idx]]).square().mean(1)
        nb = torch.bincount(cell, minlength=C * K).view(C, K).to(x.dtype)
        vhat = torch.zeros(C * K, device=x.device, dtype=x.dtype).index_add(0, cell, sq).view(C, K) / nb.clamp(min=1)
        size = s.weights * s.class_count[:, None]
        rho = torch.where(valid, (c.rho_scale * nb / size.clamp(min=1e-12)).clamp(max=c.rho_max), torch.zeros_like(nb))
        v = rho * vhat + (1 - rho) * s.vbar
        t = torch.where(valid, s.weights * log_hinge(v.clamp(min=0), self.floor, c.log_offset), torch.zeros_like(v))
        return t.sum(1)[present].mean()

    # -- Defense hooks -------------------------------------------------------------------------
    def encoder_loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        lam = self.lambda_at(ctx.epoch, getattr(ctx, "lr", None))
        if self.config.lam > 0:
            self.floor  # no noise sigma: fail at the first step, not when the term starts
        if lam == 0:
            return {}
        h = self.hinge(ctx.z, ctx.y)
        return {} if h is None else {"loss": lam * h}

    def on_train_start(self, ctx: EpochContext) -> dict[str, float]:
        """``schedule = finetune``: the statistics of the trained encoder, before the first step."""
        if self.config.schedule != "finetune" or self.config.lam == 0:
            return {}
        return self.on_epoch_end(ctx)

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        if ctx.epoch + 2 < self.acts_from:  # not needed before the epoch the term starts
            return {}
        train = ctx.data.train
        n = self.config.max_samples
        split = train if not n or n >= len(train) else type(train)(
            train.images[:n], train.labels[:n], None if train.indices is None else train.indices[:n])
        z, y = ctx.features(split)
        counts = torch.bincount(torch.as_tensor(train.labels), minlength=ctx.data.num_classes)
        return self.fit(z, y, ctx.data.num_classes, counts, epoch=ctx.epoch)

    def module(self) -> nn.Module:
        return self.stats


def _diag_log_prob_batched(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """log N(x_b; mu_bk, diag var_bk) for per-sample component sets (B x K x D)."""
    var = var.clamp(min=1e-12)
    d2 = ((x[:, None, :] - mu).square() / var).sum(-1)
    return -0.5 * (d2 + torch.log(var).sum(-1))


__all__ = ["CEM", "CEMConfig", "CEMStats", "kmeans", "kmeans_pp", "fit_diag_gmm", "log_hinge"]
