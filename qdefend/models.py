"""Split-model zoo: an edge encoder (device) and a cloud head, cut at a configurable layer.

Only z = encoder(x) crosses the network, so the cut decides what an attacker sees. The reference
split is the one of the CEM / ResSFL code: VGG11-BN with two conv blocks on the edge, then a
bottleneck conv3x3(128->8) and a Sigmoid (z is 8x7x7 for 28x28 input, 8x8x8 for 32x32); the head
restores the channels with conv3x3(8->128*head_width)-BN-ReLU and runs the rest of VGG11.

Paper: Xia et al., "Theoretical Insights in Model Inversion Robustness and Conditional Entropy
Maximization for Collaborative Inference Systems", CVPR 2025 (arXiv 2503.00383), reference split.

Every model is a list of *stages*; ``cut`` is how many stages run on the edge (a stem, when the
family has one, always does). Stages are built from plain nn.Conv2d / BatchNorm2d / ReLU /
MaxPool2d / Linear / Sigmoid modules with residual adds written ``out + identity``, so the encoder
exports with ``torch.export`` (dynamic batch) and quantizes with torchao pt2e XNNPACK-style QAT.
Max pools use ``ceil_mode=True`` and the classifier sits after an adaptive average pool, so any
input size (1x28x28, 3x32x32, smaller) works at every cut.

Partition analysis (features after every candidate cut): :func:`stage_outputs` runs a model and
returns the activation after each stage, keyed ``"stage{k}"`` with k the cut that would release it
(plus ``"z"`` and ``"logits"``). For one architecture at all cuts, build it with the deepest cut
and no bottleneck: ``build_model(ModelConfig(name, cut=max(valid_cuts(name)),
bottleneck_channels=0, sigmoid=False), in_shape, n)``. :func:`count_macs` / :func:`count_params`
give the cost per image of an encoder or head.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
import torch
from torch import nn

from .checks import check_number
from .errors import QdefendError
from .registry import Registry

__all__ = [
    "MODELS", "ModelConfig", "SplitModel", "build_model", "valid_cuts", "reference_cut",
    "feature_shape", "encoder_stages", "stage_outputs", "count_macs", "count_params",
]


@dataclass(frozen=True)
class StageSpec:
    """One cut stage: ``kind`` "conv" (conv3x3-BN-ReLU [+ maxpool]), "basic" (ResNet BasicBlock)
    or "dwsep" (dw3x3-BN-ReLU + pw1x1-BN-ReLU); ``channels`` at width 1.0."""

    kind: str
    channels: int
    stride: int = 1
    pool: bool = False

    def build(self, cin: int, width: float) -> tuple[nn.Module, int]:
        cout = _ch(self.channels, width)
        if self.kind == "basic":
            return BasicBlock(cin, cout, self.stride), cout
        if self.kind == "dwsep":
            layers = _conv_bn_relu(cin, cin, 3, self.stride, groups=cin) + _conv_bn_relu(cin, cout, 1)
        else:
            layers = _conv_bn_relu(cin, cout, 3, self.stride)
        if self.pool:
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        return nn.Sequential(*layers), cout


@dataclass(frozen=True)
class ModelFamily:
    """One architecture: an optional stem (always on the edge) and its cut stages."""

    name: str
    stem: StageSpec | None
    stages: tuple[StageSpec, ...]
    reference_cut: int
    doc: str

    @property
    def cuts(self) -> list[int]:
        return list(range(1, len(self.stages) + 1))


MODELS: Registry[ModelFamily] = Registry("model")


def _register(family: ModelFamily) -> None:
    MODELS.register(help=family.doc)(family)


def valid_cuts(name: str) -> list[int]:
    """Cuts accepted by ``name``: the number of stages on the edge, 1 .. all of them."""
    return MODELS.get(name).cuts


def reference_cut(name: str) -> int:
    """The cut used when ``ModelConfig.cut`` is None (the papers' split for this model)."""
    return MODELS.get(name).reference_cut


@dataclass
class ModelConfig:
    """Which split model to build and where to cut it.

    head_width scales the cloud head's channels (1.0 = paper widths). The default 0.125 makes the
    head cost a third of the encoder's per step on a CPU (at 0.25 it took ~25% of a QAT step on
    2 AVX2 cores) while the reference encoder, what the privacy results are about, keeps its
    paper widths.
    """

    name: str = "vgg11_bn"
    cut: int | None = None
    bottleneck_channels: int = 8
    sigmoid: bool = True
    head_width: float = 0.125
    width: float = 1.0

    def __post_init__(self) -> None:
        family = MODELS.get(self.name)
        if self.cut is not None and self.cut not in family.cuts:
            raise QdefendError(
                f"cut={self.cut} is not valid for model '{self.name}'. Valid cuts: "
                f"{family.cuts[0]}..{family.cuts[-1]} (convs on the device; the reference is "
                f"{family.reference_cut}, e.g. --set model.cut={family.reference_cut})."
            )
        check_number(self.bottleneck_channels, "model.bottleneck_channels (0 = no bottleneck conv)", lo=0,
                     integer=True, fix="--set model.bottleneck_channels=8 (the reference)")
        if self.sigmoid and self.bottleneck_channels == 0:
            raise QdefendError(
                "sigmoid=True follows the bottleneck conv, but bottleneck_channels=0 has none; use "
                "ModelConfig(bottleneck_channels=0, sigmoid=False)."
            )
        for field in ("head_width", "width"):
            check_number(getattr(self, field), f"model.{field}", lo=0, lo_open=True, example=1.0)

    @property
    def resolved_cut(self) -> int:
        return self.cut if self.cut is not None else reference_cut(self.name)


class SplitModel(nn.Module):
    """encoder (edge): normalized image N,C,H,W -> z; head (cloud): z -> logits."""

    def __init__(self, encoder: nn.Sequential, head: nn.Sequential, cfg: ModelConfig):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.cfg = cfg

    @property
    def cut(self) -> int:
        return self.cfg.resolved_cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


# ---------------------------------------------------------------- building blocks


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=False),
    ]


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


# ---------------------------------------------------------------- families

_VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]

_register(ModelFamily(
    "vgg11_bn", None,
    # one stage per conv, each with the maxpool that follows it
    tuple(StageSpec("conv", v, pool=i + 1 < len(_VGG11) and _VGG11[i + 1] == "M")
          for i, v in enumerate(_VGG11) if v != "M"),
    reference_cut=2,
    doc="VGG11-BN; cut = convs on the edge (1..8), reference 2 (CEM/ResSFL split).",
))

_register(ModelFamily(
    "resnet20", StageSpec("conv", 16),
    tuple(StageSpec("basic", c, stride=2 if (i == 0 and c != 16) else 1)
          for c in (16, 32, 64) for i in range(3)),
    reference_cut=3,
    doc="CIFAR ResNet-20; cut = BasicBlocks on the edge (1..9), reference 3 (end of stage 1).",
))

_register(ModelFamily(
    "mobilenet", StageSpec("conv", 32),
    tuple(StageSpec("dwsep", c, stride=s)
          for c, s in [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]),
    reference_cut=2,
    doc="Small MobileNet-V1 (stride-1 stem, 7 dw-separable blocks); cut = blocks on edge (1..7).",
))


# ---------------------------------------------------------------- assembly


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def build_model(cfg: ModelConfig, in_shape: tuple[int, int, int], num_classes: int) -> SplitModel:
    """Build the split model ``cfg`` for images of ``in_shape`` (C, H, W) and ``num_classes``.

    Encoder: [stem] + stages 1..cut + [bottleneck conv3x3(C->bottleneck_channels, bias) + Sigmoid].
    Head: [conv3x3(bottleneck->C_cut*head_width)-BN-ReLU] + stages cut+1.. at head_width +
    adaptive avgpool + Linear. Weights use kaiming init, deterministic under torch.manual_seed.
    """
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise QdefendError(f"in_shape={tuple(in_shape)} must be (C, H, W) with C, H, W >= 1, e.g. (1, 28, 28).")
    if num_classes < 2:
        raise QdefendError(f"num_classes={num_classes} must be >= 2, e.g. 10 for Fashion-MNIST.")
    family = MODELS.get(cfg.name)
    cut = cfg.resolved_cut

    enc: OrderedDict[str, nn.Module] = OrderedDict()
    c = in_shape[0]
    if family.stem is not None:
        enc["stem"], c = family.stem.build(c, cfg.width)
    for k in range(1, cut + 1):
        enc[f"stage{k}"], c = family.stages[k - 1].build(c, cfg.width)

    head: OrderedDict[str, nn.Module] = OrderedDict()
    if cfg.bottleneck_channels > 0:
        enc["bottleneck"] = nn.Conv2d(c, cfg.bottleneck_channels, 3, stride=1, padding=1, bias=True)
        if cfg.sigmoid:
            enc["sigmoid"] = nn.Sigmoid()
        c = _ch(family.stages[cut - 1].channels, cfg.head_width)
        head["adapter"] = nn.Sequential(*_conv_bn_relu(cfg.bottleneck_channels, c))
    for k in range(cut + 1, len(family.stages) + 1):
        head[f"stage{k}"], c = family.stages[k - 1].build(c, cfg.head_width)
    head["pool"] = nn.AdaptiveAvgPool2d(1)
    head["flatten"] = nn.Flatten(1)
    head["fc"] = nn.Linear(c, num_classes)

    model = SplitModel(nn.Sequential(enc), nn.Sequential(head), cfg)
    _init_weights(model)
    return model


# ---------------------------------------------------------------- inspection


class _EvalNoGrad:
    """Run a module in eval mode without autograd, restoring its train/eval flags afterwards."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        return self.module

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        for m, flag in self.flags:
            m.training = flag


def _probe(module: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    p = next(module.parameters(), None)
    return torch.zeros(1, *in_shape, dtype=p.dtype if p is not None else torch.float32)


def feature_shape(model: SplitModel, in_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """Shape of z = encoder(x) for one image of ``in_shape`` (no batch dim), e.g. (8, 7, 7)."""
    with _EvalNoGrad(model.encoder) as enc:
        return tuple(enc(_probe(enc, in_shape)).shape[1:])


def encoder_stages(model: SplitModel) -> list[nn.Module]:
    """The encoder's cut stages in order (stem and bottleneck excluded): ``cut`` modules."""
    return [m for name, m in model.encoder.named_children() if name.startswith("stage")]


def stage_outputs(model: SplitModel, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
    """Activations of ``x`` after every stage, for partition analysis (e.g. GPZ radii).

    Keys in order: ``stage1``..``stage{cut}`` (edge), ``z`` (what is released), ``stage{cut+1}``..
    (head; after the adapter when there is a bottleneck), ``logits``. ``stage{k}`` is what cut k
    would release without a bottleneck. Runs in the model's current mode; wrap in no_grad yourself.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    h = x
    for part in (model.encoder, model.head):
        for name, m in part.named_children():
            h = m(h)
            if name.startswith("stage"):
                out[name] = h
        out["z" if part is model.encoder else "logits"] = h
    return out


def count_macs(module: nn.Module, in_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per image of Conv2d and Linear layers (BN, pools, adds not counted).

    Conv: C_in/groups * C_out * k_h * k_w * H_out * W_out; Linear: in * out. Measured with forward
    hooks on one zero image in eval mode (the module's mode is restored).
    """
    total = 0

    def hook(m: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += (m.in_channels // m.groups) * kh * kw * output[0].numel()
        else:
            total += m.in_features * output[0].numel()

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with _EvalNoGrad(module) as mod:
            mod(_probe(mod, in_shape))
    finally:
        for h in handles:
            h.remove()
    return total


def count_params(module: nn.Module) -> int:
    """Number of parameters (weights, biases, BN affine), buffers excluded."""
    return sum(p.numel() for p in module.parameters())
