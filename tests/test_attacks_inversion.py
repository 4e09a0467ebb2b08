"""Tests for the full-strength inversion attacker: CEM's residual decoder and its training loop, the
WGAN-GP refinement (critic, gradient penalty, loss terms), the convergence flag on synthetic curves,
CEM's two attacker-data protocols (which images the attacker holds, which it inverts, and that the
two never meet), and the torch wire grid against the device runtime's.

Real data: Fashion-MNIST through qdefend.data (small limits); no run is trained here (the attacks on
real artifacts are in test_attacks.py)."""

import numpy as np
import pytest
import torch

from qdefend.attacks import AttackError, build_attack
from qdefend.attacks.attacker import AttackerData, attacker_split, augmented_views
from qdefend.decoders import ResBlock
from qdefend.attacks.inversion.decoder import (DecoderConfig, InverseNet, ResDecoder, build_decoder, decode,
                                               train_decoder)
from qdefend.attacks.inversion.gan import Critic, GanConfig, gradient_penalty, sharpness, train_gan
from qdefend.attacks.metrics import convergence
from qdefend.edge.release import wire_torch
from qdefend.config import DataConfig
from qdefend.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig(limit_train=3000, limit_test=1200, val_size=200, aux_size=1000))


# ------------------------------------------------------------------ networks


def test_residual_decoder_is_cems_res_normN8C64():
    net = ResDecoder((8, 7, 7), (1, 28, 28))
    mods = list(net.modules())
    assert sum(isinstance(m, ResBlock) for m in mods) == 10  # in->64, 8 at 64, 64->C
    convt = [m for m in mods if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(convt) == 2 and all(m.stride == (2, 2) and m.kernel_size == (3, 3) for m in convt)
    assert net.out.conv1.out_channels == 1 and net.body[0].conv1.out_channels == 64
    out = net(torch.rand(3, 8, 7, 7))
    assert out.shape == (3, 1, 28, 28) and 0 < out.min() and out.max() < 1
    # other shapes: a CIFAR cut (8x8 -> 32x32), a 16x16 -> 32 cut, a vector cut
    assert ResDecoder((8, 8, 8), (3, 32, 32), blocks=1, width=8)(torch.rand(2, 8, 8, 8)).shape == (2, 3, 32, 32)
    assert ResDecoder((4, 16, 16), (3, 32, 32), blocks=0, width=8)(torch.rand(2, 4, 16, 16)).shape == (2, 3, 32, 32)
    assert ResDecoder((10,), (1, 28, 28), blocks=0, width=8)(torch.rand(2, 10)).shape == (2, 1, 28, 28)
    plain = build_decoder(DecoderConfig(arch="plain", blocks=0, width=16), (8, 7, 7), (1, 28, 28))
    assert isinstance(plain, InverseNet) and plain(torch.rand(2, 8, 7, 7)).shape == (2, 1, 28, 28)


def test_decoder_training_learns_keeps_the_best_epoch_and_stops_early(data):
    x = data.aux.floats(slice(0, 256))
    z = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 4).repeat(1, 8, 1, 1).numpy()  # an invertible "encoder"
    cfg = DecoderConfig(blocks=1, width=16, epochs=6, batch_size=32, lr=3e-3, patience=2, device="cpu")
    net = build_decoder(cfg, (8, 7, 7), (1, 28, 28))
    net, rec = train_decoder(net, z[:224], x[:224], cfg, seed=0, z_val=z[224:], x_val=x[224:])
    assert rec["curve_of"] == "held-out attacker images" and rec["epochs_run"] == len(rec["curve"]) <= 6
    assert rec["curve"][-1] < rec["curve"][0] * 0.8 and rec["train_curve"][0] > rec["train_curve"][-1]
    best = min(rec["curve"])
    assert rec["curve"][rec["best_epoch"] - 1] == best
    held = float(((decode(net, z[224:]) - x[224:]) ** 2).mean())
    assert held == pytest.approx(best, rel=1e-4)  # the best held-out epoch's weights are the ones kept
    assert set(rec) >= {"converged", "tail_gain", "stopped_early", "device"} and rec["device"] == "cpu"


def test_fresh_release_noise_is_drawn_for_every_batch(data):
    x = data.aux.floats(slice(0, 64))
    z = np.zeros((64, 8, 7, 7), np.float32)
    seen = []

    def simulate(zb, g):
        out = zb + 0.1 * torch.randn(zb.shape, generator=g)
        seen.append(out.clone())
        return out

    cfg = DecoderConfig(arch="plain", blocks=0, width=4, epochs=2, batch_size=32, patience=0, device="cpu")
    train_decoder(build_decoder(cfg, (8, 7, 7), (1, 28, 28)), z, x, cfg, 0, simulate=simulate)
    assert len(seen) == 4 and all(not torch.equal(seen[0], s) for s in seen[1:])
    assert abs(float(torch.cat(seen).std()) - 0.1) < 0.005


def _is_shift_of(img, orig, s):
    pad = np.pad(orig, ((0, 0), (s, s), (s, s)))
    return any(np.array_equal(img, np.roll(pad, (-dy, -dx), (1, 2))[:, s:-s, s:-s])
               for dy in range(-s, s + 1) for dx in range(-s, s + 1))


def test_augmented_views_flip_and_shift_real_images(data):
    x = data.aux.floats(slice(0, 50))
    rng = np.random.default_rng(0)
    flip = augmented_views(x, "flip", 1, 2, rng)
    assert flip.shape == (1, *x.shape) and np.array_equal(flip[0], x[..., ::-1])
    shift = augmented_views(x, "shift", 3, 2, rng)
    assert shift.shape == (3, *x.shape)
    # each view is its image moved by at most 2 pixels each way, the border zero-filled
    assert all(_is_shift_of(img, orig, 2) for v in shift for img, orig in zip(v, x))
    assert (shift != x).any(axis=(2, 3, 4)).mean() > 0.8  # 24 of 25 shifts move the image
    both = augmented_views(x, "flip+shift", 2, 1, rng)
    mirrored = [not _is_shift_of(img, orig, 1) and _is_shift_of(img[..., ::-1], orig, 1)
                for v in both for img, orig in zip(v, x)]
    assert all(_is_shift_of(img, orig, 1) or _is_shift_of(img[..., ::-1], orig, 1) for v in both for img, orig in zip(v, x))
    assert 0.3 < np.mean(mirrored) < 0.7
    with pytest.raises(AttackError, match="augment=flip gives one more view"):
        augmented_views(x, "flip", 2, 2, rng)
    with pytest.raises(AttackError, match="decoder.augment must be one of"):
        DecoderConfig(augment="rotate")
    with pytest.raises(AttackError, match="views=2"):
        DecoderConfig(augment="flip", views=3)


def test_decoder_trains_on_views_one_random_view_an_image_per_step(data):
    x = data.aux.floats(slice(0, 64))
    z = np.zeros((64, 8, 7, 7), np.float32)
    z2 = np.ones((64, 8, 7, 7), np.float32)  # the second view's features: marked
    seen = []

    def simulate(zb, g):
        seen.append(zb.clone())
        return zb

    cfg = DecoderConfig(arch="plain", blocks=0, width=4, epochs=3, batch_size=32, patience=0, device="cpu")
    _, rec = train_decoder(build_decoder(cfg, (8, 7, 7), (1, 28, 28)), [z, z2], [x, x[..., ::-1]], cfg, 0,
                           simulate=simulate)
    marks = torch.cat([s.flatten(1)[:, 0] for s in seen])
    assert rec["views"] == 2 and len(seen) == 6 and len(marks) == 3 * 64  # the same steps as one view
    assert 0.35 < float(marks.mean()) < 0.65  # each image in a view drawn at random
    with pytest.raises(ValueError, match="same number of views"):
        train_decoder(build_decoder(cfg, (8, 7, 7), (1, 28, 28)), [z, z2], [x], cfg, 0)


# ------------------------------------------------------------------ GAN


def test_critic_shapes_and_gradient_penalty_of_a_linear_critic():
    for shape in ((1, 28, 28), (3, 32, 32)):
        assert Critic(shape, width=8)(torch.rand(5, *shape)).shape == (5,)

    class Linear(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            w = torch.randn(1, 1, 4, 4)
            self.w = w / w.norm() * norm

        def forward(self, x):
            return (x * self.w).flatten(1).sum(1)

    real, fake = torch.rand(6, 1, 4, 4), torch.rand(6, 1, 4, 4)
    assert float(gradient_penalty(Linear(1.0), real, fake)) == pytest.approx(0.0, abs=1e-10)
    assert float(gradient_penalty(Linear(3.0), real, fake)) == pytest.approx(4.0, rel=1e-5)  # (3 - 1)^2


def test_sharpness_orders_blurred_and_sharp_images():
    sharp = np.zeros((2, 1, 8, 8), np.float32)
    sharp[:, :, :, ::2] = 1
    blurred = np.full_like(sharp, 0.5)
    assert sharpness(sharp) == pytest.approx(0.5) and sharpness(blurred) == 0.0


def test_gan_steps_follow_the_critic_ratio_and_the_pixel_term_keeps_the_decoder(data):
    x = data.aux.floats(slice(0, 128))
    z = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 4).repeat(1, 8, 1, 1).numpy()
    dcfg = DecoderConfig(blocks=0, width=8, epochs=4, batch_size=32, lr=3e-3, patience=0, device="cpu")
    dec, _ = train_decoder(build_decoder(dcfg, (8, 7, 7), (1, 28, 28)), z, x, dcfg, 0)
    start = float(((decode(dec, z) - x) ** 2).mean())
    cfg = GanConfig(epochs=2, batch_size=16, n_critic=4, critic_width=8, device="cpu", mse_weight=1500.0)
    gen, rec = train_gan(dec, z, x, cfg, 0, z_val=z[:32], x_val=x[:32])
    assert rec["generator_steps"] == (2 * 128 // 16) // 4 and len(rec["critic_loss"]) == 2
    assert rec["start_mse"] == pytest.approx(float(((decode(dec, z[:32]) - x[:32]) ** 2).mean()), rel=1e-4)
    end = float(((decode(gen, z) - x) ** 2).mean())
    assert end < 1.5 * start  # the 1500 x MSE term holds the generator near the decoder's answer
    with pytest.raises(AttackError, match="decoder_preset must be one of default, plain, fast, cem, quick"):
        GanConfig(decoder_preset="huge")


# ------------------------------------------------------------------ convergence


def test_convergence_flag_on_synthetic_curves():
    flat = [1.0, 0.5, 0.3, 0.25, 0.2, 0.199, 0.1985, 0.198, 0.1975, 0.197]  # tail: 0.198 -> 0.197
    falling = [1.0 / (i + 1) for i in range(10)]
    assert convergence(flat) == {"converged": True, "tail_gain": pytest.approx(0.005, abs=1e-3)}
    assert convergence(falling)["converged"] is False and convergence(falling)["tail_gain"] == pytest.approx(0.2)
    assert convergence([0.3, 0.2, 0.1])["converged"] is False  # too short to tell
    assert convergence([0.2, 0.1, 0.1, 0.1, 0.12, 0.15])["converged"] is True  # got worse at the end
    assert convergence([0.2, 0.1, float("nan"), 0.1, 0.1, 0.1])["converged"] is False


# ------------------------------------------------------------------ CEM's protocols


def _rows(split, x):
    return {im.tobytes() for im in (x * 255).round().astype(np.uint8)}


def test_infer_time_trains_on_the_test_prefix_and_inverts_the_rest(data):
    s = attacker_split(data, AttackerData(protocol="infer_time", n_eval=200))
    n = len(data.test)
    assert s.describe["attacker_images"] == n - 200 and list(s.eval_idx) == list(range(n - 200, n))
    assert len(s.x_holdout) == round(0.1 * (n - 200)) and len(s.x_train) + len(s.x_holdout) == n - 200
    assert not _rows(s, s.pool) & _rows(s, s.x_eval)  # never trains on an image it inverts
    assert np.array_equal(s.x_eval, data.test.floats(s.eval_idx)) and not s.describe["overlap_with_victim_training"]
    with pytest.raises(AttackError, match="infer_time offers 1000 attacker images"):
        attacker_split(data, AttackerData(protocol="infer_time", n_eval=200, aux_size=5000))


def test_train_time_uses_aux_then_victim_training_images_only_when_asked(data):
    s = attacker_split(data, AttackerData(protocol="train_time", n_eval=200))
    assert s.describe["sources"] == {"aux": 1000} and not s.describe["overlap_with_victim_training"]
    assert not _rows(s, s.pool) & _rows(s, data.train.floats())  # the aux split is disjoint from training
    with pytest.raises(AttackError, match="add --set attacker.overlap=true"):
        attacker_split(data, AttackerData(protocol="train_time", aux_size=1500))
    big = attacker_split(data, AttackerData(protocol="train_time", aux_size=1500, overlap=True, n_eval=200))
    assert big.describe["attacker_images"] == 1500 and big.describe["overlap_with_victim_training"]
    assert len(_rows(big, big.pool) & _rows(big, data.train.floats())) >= 490  # 500 victim training images
    same = attacker_split(data, AttackerData(protocol="infer_time", n_eval=200))
    assert np.array_equal(big.eval_idx, same.eval_idx)  # both protocols invert the same private images
    assert not _rows(big, big.pool) & _rows(big, big.x_eval)


def test_attacker_settings_are_checked_and_take_the_attacker_section():
    atk = build_attack("decoder", **{"attacker.aux_size": 20000, "attacker.protocol": "train_time",
                                     "attacker.overlap": True})
    assert (atk.config.aux_size, atk.config.protocol, atk.config.overlap) == (20000, "train_time", True)
    assert build_attack("gan", **{"attacker.n_eval": 10}).config.n_eval == 10
    with pytest.raises(AttackError, match="protocol must be one of infer_time, train_time"):
        build_attack("decoder", protocol="test_time")
    with pytest.raises(AttackError, match="holdout must be in"):
        build_attack("decoder", holdout=0.7)
    with pytest.raises(AttackError, match="arch must be one of res, plain"):
        build_attack("decoder", arch="unet")
    d = build_attack("decoder").config  # the defaults are CEM's attacker, at a batch that steps enough
    assert (d.arch, d.blocks, d.width, d.epochs, d.batch_size, d.lr, d.weight_decay, d.lr_min) == \
        ("res", 8, 64, 50, 64, 2e-3, 1e-4, 1e-5)
    c = build_attack("decoder", preset="cem").config  # the CEM code's own batch and lr
    assert (c.batch_size, c.lr, c.arch, c.blocks, c.epochs) == (256, 1e-3, "res", 8, 50)
    g = build_attack("gan").config
    assert (g.epochs, g.batch_size, g.n_critic, g.gp_weight, g.mse_weight, g.lr_d, g.lr_g) == \
        (150, 128, 10, 10.0, 1500.0, 5e-3, 5e-4)


# ------------------------------------------------------------------ the wire grid


def test_torch_wire_grid_is_the_runtimes():
    from qdefend.edge.release import dequantize, quantize

    wire = {"scale": 1 / 255, "zero_point": -128}
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.uniform(-0.2, 1.2, 5000), (np.arange(-3, 300) + 0.5) / 255]).astype(np.float32)
    ref = dequantize(quantize(z, wire["scale"], wire["zero_point"]), wire["scale"], wire["zero_point"])
    got = wire_torch(torch.from_numpy(z), wire).numpy()
    assert np.array_equal(got, ref)
    assert wire_torch(torch.from_numpy(z), None) is not None and np.array_equal(wire_torch(torch.from_numpy(z), None).numpy(), z)
