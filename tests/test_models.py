"""Tests for qdefend.models: every registered model at every cut, the CEM reference split, costs,
partition-analysis outputs, configuration errors and torch.export with a dynamic batch.

Parametrised over the MODELS registry, so a newly registered model is tested by these tests.
Small widths (0.25) keep the whole file to a few seconds wherever the architecture is not the point.
"""

import re

import pytest
import torch

from qdefend.errors import QdefendError
from qdefend.models import (
    MODELS, ModelConfig, build_model, count_macs, count_params, encoder_stages, feature_shape,
    reference_cut, stage_outputs, valid_cuts,
)

SHAPES = [(1, 28, 28), (3, 32, 32)]
SMALL = dict(width=0.25, head_width=0.25)
ALL_CUTS = [(name, cut) for name in MODELS.names() for cut in valid_cuts(name)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name="vgg11_bn", in_shape=(1, 28, 28), num_classes=10, seed=0, **cfg):
    torch.manual_seed(seed)
    return build_model(ModelConfig(name, **cfg), in_shape, num_classes)


def _x(in_shape, n=2, seed=1):
    return torch.randn(n, *in_shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- registry sweep


def test_registry_lists_the_three_families():
    assert {"vgg11_bn", "resnet20", "mobilenet"} <= set(MODELS.names())
    for name in MODELS.names():
        cuts = valid_cuts(name)
        assert cuts == list(range(1, len(cuts) + 1)) and reference_cut(name) in cuts
        assert MODELS.describe(name)


@pytest.mark.parametrize("in_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name,cut", ALL_CUTS)
def test_every_cut_builds_and_runs(name, cut, in_shape):
    model = _build(name, in_shape, num_classes=7, cut=cut, **SMALL).eval()
    x = _x(in_shape, n=2)
    with torch.no_grad():
        z = model.encoder(x)
        logits = model.head(z)
    assert tuple(z.shape[1:]) == feature_shape(model, in_shape)
    assert z.shape[:2] == (2, 8)  # the default bottleneck releases 8 channels
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    # sigmoid after the bottleneck (deep untrained ResNets saturate it to exactly 0/1 in float32)
    assert z.min() >= 0 and z.max() <= 1
    assert len(encoder_stages(model)) == cut == model.cut
    # the head's stages are the ones the encoder does not run
    head_stages = [n for n, _ in model.head.named_children() if n.startswith("stage")]
    assert head_stages == [f"stage{k}" for k in range(cut + 1, len(valid_cuts(name)) + 1)]


@pytest.mark.parametrize("name", MODELS.names())
def test_reference_cut_is_the_default(name):
    model = _build(name, **SMALL)
    assert model.cfg.cut is None and model.cut == reference_cut(name)
    assert len(encoder_stages(model)) == reference_cut(name)


# ---------------------------------------------------------------------------------- reference split


@pytest.mark.parametrize("in_shape,z_shape", [((1, 28, 28), (8, 7, 7)), ((3, 32, 32), (8, 8, 8))])
def test_reference_vgg11_split(in_shape, z_shape):
    model = _build("vgg11_bn", in_shape, head_width=1.0).eval()
    assert model.cut == 2
    assert feature_shape(model, in_shape) == z_shape
    assert list(dict(model.encoder.named_children())) == ["stage1", "stage2", "bottleneck", "sigmoid"]
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(in_shape[0], 64), (64, 128), (128, 8)]
    assert convs[-1].bias is not None and all(c.bias is None for c in convs[:-1])
    adapter = model.head.adapter[0]
    assert (adapter.in_channels, adapter.out_channels) == (8, 128)  # head_width=1.0 restores 128
    with torch.no_grad():
        z = model.encoder(_x(in_shape, n=3))
    assert z.shape == (3, *z_shape)
    assert z.min() > 0 and z.max() < 1


def test_no_bottleneck_releases_the_last_stage():
    cfg = dict(cut=2, bottleneck_channels=0, sigmoid=False, **SMALL)
    model = _build("vgg11_bn", **cfg).eval()
    assert "bottleneck" not in dict(model.encoder.named_children())
    assert "adapter" not in dict(model.head.named_children())
    assert feature_shape(model, (1, 28, 28)) == (32, 7, 7)  # 128 * width 0.25 channels
    with torch.no_grad():
        z = model.encoder(_x((1, 28, 28)))
    assert z.min() == 0 and z.max() > 1  # ReLU output, no sigmoid squashing
    assert model.head(z).shape == (2, 10)


def test_bottleneck_without_sigmoid_is_unbounded():
    model = _build("vgg11_bn", sigmoid=False, **SMALL).eval()
    assert "sigmoid" not in dict(model.encoder.named_children())
    with torch.no_grad():
        z = model.encoder(_x((1, 28, 28), n=4))
    assert z.shape == (4, 8, 7, 7) and z.min() < 0


# ---------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("name", MODELS.names())
def test_invalid_cut_lists_the_valid_cuts(name):
    last = valid_cuts(name)[-1]
    for bad in (0, last + 1):
        with pytest.raises(QdefendError, match=re.escape(f"Valid cuts: 1..{last}")) as e:
            ModelConfig(name, cut=bad)
        assert f"--set model.cut={reference_cut(name)}" in str(e.value)  # the corrected setting


def test_unknown_model_lists_valid_names():
    with pytest.raises(QdefendError) as e:
        ModelConfig("vgg11")
    msg = str(e.value)
    assert "unknown model 'vgg11'" in msg
    assert all(n in msg for n in MODELS.names()) and "Did you mean 'vgg11_bn'" in msg


@pytest.mark.parametrize("kwargs,needle", [
    (dict(bottleneck_channels=-1), "model.bottleneck_channels (0 = no bottleneck conv) must be an integer >= 0, got -1"),
    (dict(bottleneck_channels=0), "sigmoid=False"),
    (dict(width=0.0), "model.width must be a finite number > 0, got 0.0"),
    (dict(head_width=-1.0), "model.head_width must be a finite number > 0, got -1.0"),
])
def test_config_validation(kwargs, needle):
    with pytest.raises(QdefendError, match=re.escape(needle)):
        ModelConfig(**kwargs)


def test_build_model_argument_errors():
    with pytest.raises(QdefendError, match=r"\(C, H, W\)"):
        build_model(ModelConfig(), (28, 28), 10)
    with pytest.raises(QdefendError, match="num_classes=1"):
        build_model(ModelConfig(), (1, 28, 28), 1)


# ---------------------------------------------------------------------------------- widths and costs


def _vgg_encoder_params(c0: int, c1: int, c2: int, b: int = 8) -> int:
    """conv3x3 (no bias) + BN affine per stage, then the biased bottleneck conv3x3."""
    return (c0 * c1 * 9 + 2 * c1) + (c1 * c2 * 9 + 2 * c2) + (c2 * b * 9 + b)


def test_width_scales_the_encoder_only():
    full, quarter = _build(head_width=0.25, width=1.0), _build(head_width=0.25, width=0.25)
    assert count_params(full.encoder) == _vgg_encoder_params(1, 64, 128)
    assert count_params(quarter.encoder) == _vgg_encoder_params(1, 16, 32)
    # with a bottleneck the head's channels come from head_width alone
    assert count_params(full.head) == count_params(quarter.head)


def test_head_width_scales_the_head_only():
    narrow, wide = _build(head_width=0.25, width=0.25), _build(head_width=0.5, width=0.25)
    assert count_params(narrow.encoder) == count_params(wide.encoder)
    # the head is dominated by 3x3 convs, whose parameters grow with the square of the width
    ratio = count_params(wide.head) / count_params(narrow.head)
    assert 3.5 < ratio < 4.0
    adapter = narrow.head.adapter[0], wide.head.adapter[0]
    assert [a.out_channels for a in adapter] == [32, 64]
    fc = narrow.head.fc, wide.head.fc
    assert [f.in_features for f in fc] == [128, 256]  # 512 * head_width


def test_count_macs_of_the_reference_encoder():
    model = _build(head_width=0.25)
    expected = (
        1 * 64 * 9 * 28 * 28      # conv 1->64 3x3 at 28x28
        + 64 * 128 * 9 * 14 * 14  # conv 64->128 3x3 at 14x14
        + 128 * 8 * 9 * 7 * 7     # bottleneck conv 128->8 3x3 at 7x7
    )
    assert expected == 15_353_856
    model.encoder.train()
    assert count_macs(model.encoder, (1, 28, 28)) == expected
    assert model.encoder.training and all(m.training for m in model.encoder.modules())  # mode restored
    # the head: adapter 8->32 at 7x7 ... fc 128->10 are all counted too (Linear = in * out)
    assert count_macs(model.head, (8, 7, 7)) > model.head.fc.in_features * 10


def test_count_macs_of_depthwise_and_linear():
    seq = torch.nn.Sequential(
        torch.nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # 1 * 4 * 9 * 5 * 5
        torch.nn.Flatten(1), torch.nn.Linear(100, 3),              # 100 * 3
    )
    assert count_macs(seq, (4, 5, 5)) == 4 * 9 * 25 + 300


# ---------------------------------------------------------------------------------- partition analysis


def test_stage_outputs_keys_order_and_values():
    model = _build("vgg11_bn", **SMALL).eval()
    x = _x((1, 28, 28), n=2)
    with torch.no_grad():
        out = stage_outputs(model, x)
        z, logits = model.encoder(x), model(x)
    assert list(out) == ["stage1", "stage2", "z"] + [f"stage{k}" for k in range(3, 9)] + ["logits"]
    assert torch.equal(out["z"], z) and torch.equal(out["logits"], logits)
    assert out["stage1"].shape == (2, 16, 14, 14) and out["stage2"].shape == (2, 32, 7, 7)


@pytest.mark.parametrize("name", MODELS.names())
def test_stage_outputs_at_the_deepest_cut(name):
    """The recipe of the module docstring: one build gives every candidate cut's features."""
    last = valid_cuts(name)[-1]
    model = _build(name, cut=last, bottleneck_channels=0, sigmoid=False, **SMALL).eval()
    with torch.no_grad():
        out = stage_outputs(model, _x((1, 28, 28)))
    assert list(out) == [f"stage{k}" for k in range(1, last + 1)] + ["z", "logits"]
    assert torch.equal(out["z"], out[f"stage{last}"])
    assert out["logits"].shape == (2, 10)


# ---------------------------------------------------------------------------------- determinism, export


def test_build_is_deterministic_under_manual_seed():
    a, b, c = _build(seed=3, **SMALL), _build(seed=3, **SMALL), _build(seed=4, **SMALL)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["encoder.stage1.0.weight"], sc["encoder.stage1.0.weight"])


@pytest.mark.parametrize("name", MODELS.names())
def test_encoder_exports_with_a_dynamic_batch(name):
    model = _build(name, **SMALL).eval()
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model.encoder, (_x((1, 28, 28), n=2),), dynamic_shapes=({0: batch},))
    exported = ep.module()
    for n in (2, 5):
        x = _x((1, 28, 28), n=n, seed=n)
        with torch.no_grad():
            ref = model.encoder(x)
        got = exported(x)
        assert got.shape == ref.shape == (n, *feature_shape(model, (1, 28, 28)))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
