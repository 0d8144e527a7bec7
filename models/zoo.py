"""Reference CNN architectures used as rewrite targets.

Every zoo model is built from a seed, in eval mode, with BatchNorm layers whose affine
parameters are random and whose running statistics are measured on a seeded random batch.
Random-but-measured statistics keep activations well scaled through 50+ layers (so numerical
comparisons stay meaningful) while making BN folding a non-trivial transformation.

The large architectures follow torchvision's layer definitions so published MAC counts apply,
except GoogLeNet's third inception branch, which uses the paper's 5x5 conv instead of
torchvision's 3x3.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

DEFAULT_SEED = 0
MNIST_SHAPE = (1, 1, 28, 28)
IMAGENET_SHAPE = (1, 3, 224, 224)

Shape = tuple[int, ...]
ModelFactory = Callable[[], tuple[nn.Module, Shape]]


# --------------------------------------------------------------------------- small models


def convnet() -> nn.Module:
    """Classic ConvNet with a dense head (the "before" of a 1x1+GAP rewrite)."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(3, 64, 3, padding=1),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
        nn.Sigmoid(),
    )


def convnet_gap() -> nn.Module:
    """The same ConvNet with its dense head replaced by 1x1 convs and global average pooling."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(3, 64, 3, padding=1),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(64, 32, 1),
        nn.ReLU(),
        nn.Conv2d(32, 10, 1),
        nn.AvgPool2d(7),
        nn.Flatten(),
        nn.Sigmoid(),
    )


def conv_relu(in_ch: int, out_ch: int, kernel_size: int, padding: int = 0) -> nn.Module:
    """Plain conv (with bias) + ReLU, as in the original GoogLeNet paper."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding), nn.ReLU())


# --------------------------------------------------------------------------- GoogLeNet


class BasicConv2d(nn.Module):
    """torchvision's GoogLeNet conv block: bias-free conv, BatchNorm(eps=1e-3), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, **conv_kwargs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


ConvBlock = Callable[..., nn.Module]


class Inception(nn.Module):
    """Four-branch inception module.

    The third branch uses the paper's 5x5 conv by default (torchvision uses 3x3 there, which
    drops GoogLeNet from the paper's 1.586 to 1.498 GMACs); ``branch3_kernel=3`` reproduces it.
    """

    def __init__(
        self,
        in_ch: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        conv_block: ConvBlock = BasicConv2d,
        branch3_kernel: int = 5,
    ) -> None:
        super().__init__()
        self.branch1 = conv_block(in_ch, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            conv_block(in_ch, ch3x3red, kernel_size=1),
            conv_block(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            conv_block(in_ch, ch5x5red, kernel_size=1),
            conv_block(ch5x5red, ch5x5, kernel_size=branch3_kernel, padding=branch3_kernel // 2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
            conv_block(in_ch, pool_proj, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1, self.branch2, self.branch3, self.branch4)
        return torch.cat([branch(x) for branch in branches], 1)


def inception3a() -> nn.Module:
    """GoogLeNet's inception (3a) module on its own: 192 -> 256 channels at 28x28."""
    return Inception(192, 64, 96, 128, 16, 32, 32, conv_block=conv_relu)


class GoogLeNet(nn.Module):
    """GoogLeNet (Inception v1) as in torchvision, without aux heads or input transform."""

    def __init__(self, num_classes: int = 1000, branch3_kernel: int = 5) -> None:
        super().__init__()
        inception = functools.partial(Inception, branch3_kernel=branch3_kernel)
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = inception(832, 384, 192, 384, 48, 128, 128)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            if layer is self.fc:
                x = torch.flatten(x, 1)
            x = layer(x)
        return x


# --------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv, not the first 1x1."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 v1.5 with torchvision's module layout."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
        in_ch = 64
        for index, (width, blocks, stride) in enumerate(stages, start=1):
            setattr(self, f"layer{index}", _resnet_stage(in_ch, width, blocks, stride))
            in_ch = width * Bottleneck.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            if layer is self.fc:
                x = torch.flatten(x, 1)
            x = layer(x)
        return x


def _resnet_stage(in_ch: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(in_ch, width, stride)]
    layers += [Bottleneck(width * Bottleneck.expansion, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- VGG-16

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG16(nn.Module):
    """VGG-16 (configuration D) without BatchNorm, torchvision layout."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = _vgg_features(VGG16_CFG)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg_features(cfg: Sequence[int | str], in_ch: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(item), 3, padding=1), nn.ReLU(inplace=True)]
            in_ch = int(item)
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- MobileNetV2


def conv_bn_relu6(
    in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """torchvision's Conv2dNormActivation with BatchNorm and ReLU6."""
    padding = (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 project, optional residual."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(in_ch * expand_ratio)
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_ch, hidden, kernel_size=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expand ratio t, output channels c, repeats n, first stride s), width multiplier 1.0.
MOBILENETV2_CFG = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 width 1.0 with torchvision's module layout."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        in_ch, last_ch = 32, 1280
        layers: list[nn.Module] = [conv_bn_relu6(3, in_ch, stride=2)]
        for t, c, n, s in MOBILENETV2_CFG:
            for i in range(n):
                layers.append(InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        layers.append(conv_bn_relu6(in_ch, last_ch, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_ch, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- registry

_SPECS: dict[str, tuple[Callable[[], nn.Module], Shape]] = {
    "convnet": (convnet, MNIST_SHAPE),
    "convnet_gap": (convnet_gap, MNIST_SHAPE),
    "inception3a": (inception3a, (1, 192, 28, 28)),
    "googlenet": (GoogLeNet, IMAGENET_SHAPE),
    "resnet50": (ResNet50, IMAGENET_SHAPE),
    "vgg16": (VGG16, IMAGENET_SHAPE),
    "mobilenetv2": (MobileNetV2, IMAGENET_SHAPE),
}


def build(name: str, seed: int = DEFAULT_SEED) -> tuple[nn.Module, Shape]:
    """Build zoo model ``name`` in eval mode with seeded weights; return it and its input shape."""
    if name not in _SPECS:
        raise KeyError(f"unknown zoo model {name!r}; choose from {sorted(_SPECS)}")
    constructor, shape = _SPECS[name]
    with torch.random.fork_rng(devices=[]):  # constructors draw default inits: spare caller RNG
        torch.manual_seed(seed)
        model = constructor()
    generator = torch.Generator().manual_seed(seed)
    init_weights(model, generator)
    calibrate_batchnorm(model, shape, generator)
    return model.eval(), shape


ZOO: dict[str, ModelFactory] = {name: functools.partial(build, name) for name in _SPECS}


def example_input(shape: Shape, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """A seeded standard-normal input, so tests and exports see the same tensor."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- initialisation


def init_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Variance-preserving weights, small random biases and random BN affine parameters.

    Fan-in He init keeps plain (non-BN) stacks such as VGG-16 from vanishing; non-zero biases
    and BN affines make sure bias-merging rewrites are exercised.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
                if module.bias is not None:
                    nn.init.uniform_(module.bias, -0.1, 0.1, generator=generator)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.uniform_(module.weight, 0.5, 1.5, generator=generator)
                nn.init.normal_(module.bias, 0.0, 0.1, generator=generator)


def _batchnorms(model: nn.Module) -> Iterator[nn.BatchNorm2d]:
    return (m for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def calibrate_batchnorm(
    model: nn.Module, shape: Shape, generator: torch.Generator, batch: int = 2
) -> None:
    """Set BN running statistics to those of a seeded random batch (cumulative average).

    Measured statistics are non-trivial (mean != 0, var != 1) yet keep eval-mode activations
    well scaled, which hand-drawn random statistics would not through deep networks. The pass
    runs single-threaded so exports are byte-identical whatever the caller's thread count.
    """
    batchnorms = list(_batchnorms(model))
    if not batchnorms:
        return
    model.eval()  # only BN trains: dropout would draw from (and advance) the global RNG
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: one batch sets the stats exactly
        bn.train()
    x = torch.randn((batch, *shape[1:]), generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # multi-threaded reductions vary in the last bits with thread count
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.eval()
        torch.set_num_threads(threads)
    for bn in batchnorms:
        bn.momentum = 0.1


# --------------------------------------------------------------------------- MAC counting


def count_macs(model: nn.Module, shape: Shape) -> int:
    """Multiply-accumulates of Conv2d and Linear layers for one forward pass at ``shape``.

    A torch-side reference for cross-checking ONNX cost models; pooling, BN and activations
    are not counted, matching how published GMAC figures are usually quoted.
    """
    total = 0

    def hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    finally:
        for handle in handles:
            handle.remove()
    return total
