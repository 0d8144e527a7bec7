"""A small anchor-free YOLOv8-style digit detector, exported with a YOLOv8 export's layout.

The digits CNN judges classifiers; this network judges rewrites of detectors, whose single
output concatenates box coordinates in pixels (hundreds of times larger) with sigmoid class
scores in [0, 1] — the case where whole-tensor metrics hide lost detections.

Architecture (YOLOv8 family, scaled down): Conv(3x3)+BN+SiLU blocks, C2f blocks (1x1 conv, split,
3x3 bottlenecks, concat, 1x1), an FPN/PAN neck, decoupled heads at strides 8/16/32 (a box branch
and a class branch of 3x3 convs each) and a DFL box decoder. The export keeps every BatchNorm
(like a real export before fusing) and decodes inside the graph:

* input ``images`` float32 ``[N, 3, H, W]`` in [0, 1] (dynamic batch, fixed ``H = W = 96``);
* output ``output0`` float32 ``[N, 4 + 10, anchors]``: ``cx, cy, w, h`` in input pixels, then 10
  sigmoid class scores; anchors are the cells of the 12x12, 6x6 and 3x3 grids (189), in that order.

Training data and the training loop live in ``models.detector_data`` and
``models.train_detector`` (``python -m models.train_detector`` reproduces the shipped files).
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 96
NUM_CLASSES = 10
STRIDES = (8, 16, 32)
REG_MAX = 8  # DFL bins per box side: distances 0..REG_MAX-1 in stride units
# Backbone widths: stem (stride 2), stride 4, P3 (8), P4 (16), P5 (32).
WIDTHS = (16, 32, 64, 96, 128)
HEAD_WIDTH = 32


class ConvBNSiLU(nn.Module):
    """Conv (no bias) + BatchNorm + SiLU, the unit every YOLOv8 layer is built from."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 ConvBNSiLU with an optional residual, as in YOLOv8's C2f."""

    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = ConvBNSiLU(c, c, 3)
        self.cv2 = ConvBNSiLU(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """1x1 conv, split in two halves, a chain of bottlenecks on one half, concat all, 1x1 conv."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = c_out // 2
        self.cv1 = ConvBNSiLU(c_in, 2 * self.c, 1)
        self.cv2 = ConvBNSiLU((2 + n) * self.c, c_out, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class Backbone(nn.Module):
    """Stem and four stride-2 stages; returns the stride 8, 16 and 32 feature maps."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.stem = ConvBNSiLU(3, w0, 3, 2)
        self.stage1 = nn.Sequential(ConvBNSiLU(w0, w1, 3, 2), C2f(w1, w1))
        self.stage2 = nn.Sequential(ConvBNSiLU(w1, w2, 3, 2), C2f(w2, w2))
        self.stage3 = nn.Sequential(ConvBNSiLU(w2, w3, 3, 2), C2f(w3, w3))
        self.stage4 = nn.Sequential(ConvBNSiLU(w3, w4, 3, 2), C2f(w4, w4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3 = self.stage2(self.stage1(self.stem(x)))
        p4 = self.stage3(p3)
        p5 = self.stage4(p4)
        return p3, p4, p5


class Neck(nn.Module):
    """YOLOv8's FPN (top-down upsample + concat + C2f) then PAN (bottom-up stride-2 conv)."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        c3, c4, c5 = widths[2:]
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.td4 = C2f(c5 + c4, c4, shortcut=False)
        self.td3 = C2f(c4 + c3, c3, shortcut=False)
        self.down3 = ConvBNSiLU(c3, c3, 3, 2)
        self.bu4 = C2f(c3 + c4, c4, shortcut=False)
        self.down4 = ConvBNSiLU(c4, c4, 3, 2)
        self.bu5 = C2f(c4 + c5, c5, shortcut=False)

    def forward(
        self, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> list[torch.Tensor]:
        p3, p4, p5 = feats
        t4 = self.td4(torch.cat([self.up(p5), p4], 1))
        n3 = self.td3(torch.cat([self.up(t4), p3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], 1))
        return [n3, n4, n5]


def make_anchors(size: int, strides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres ``[2, A]`` (in grid units, +0.5) and per-anchor strides ``[1, A]``."""
    points, stride_rows = [], []
    for stride in strides:
        cells = size // stride
        grid = torch.arange(cells, dtype=torch.float32) + 0.5
        yy, xx = torch.meshgrid(grid, grid, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)]))
        stride_rows.append(torch.full((1, cells * cells), float(stride)))
    return torch.cat(points, 1), torch.cat(stride_rows, 1)


class DFL(nn.Module):
    """Distribution focal loss decoder: softmax over bins, then their expectation (a fixed 1x1)."""

    def __init__(self, bins: int = REG_MAX) -> None:
        super().__init__()
        self.bins = bins
        self.conv = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(bins, dtype=torch.float32).view(1, bins, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, a = x.shape  # x: [N, 4 * bins, A]
        probs = x.view(n, 4, self.bins, a).transpose(2, 1).softmax(1)
        return self.conv(probs).view(n, 4, a)


class DetectHead(nn.Module):
    """Decoupled per-level heads; in eval mode decodes to YOLOv8's ``[N, 4 + C, A]``.

    In training mode it returns the raw per-anchor ``(box_logits [N, A, 4*bins],
    class_logits [N, A, C])`` that the loss needs.
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        num_classes: int = NUM_CLASSES,
        size: int = IMAGE_SIZE,
        strides: tuple[int, ...] = STRIDES,
        width: int = HEAD_WIDTH,
    ) -> None:
        super().__init__()
        self.nc = num_classes
        self.box = nn.ModuleList(
            nn.Sequential(
                ConvBNSiLU(c, width, 3), ConvBNSiLU(width, width, 3),
                nn.Conv2d(width, 4 * REG_MAX, 1),
            )
            for c in channels
        )
        self.cls = nn.ModuleList(
            nn.Sequential(
                ConvBNSiLU(c, width, 3), ConvBNSiLU(width, width, 3),
                nn.Conv2d(width, num_classes, 1),
            )
            for c in channels
        )
        self.dfl = DFL(REG_MAX)
        anchors, stride_row = make_anchors(size, strides)
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("stride_row", stride_row, persistent=False)
        self._init_biases(size, strides)

    def _init_biases(self, size: int, strides: tuple[int, ...]) -> None:
        """YOLOv8's prior: class logits start near 5 objects per 640^2 image, boxes neutral."""
        for branch, stride in zip(self.cls, strides, strict=True):
            prior = 5 / self.nc / (size / stride) ** 2
            nn.init.constant_(branch[-1].bias, float(torch.logit(torch.tensor(prior))))
        for branch in self.box:
            nn.init.constant_(branch[-1].bias, 1.0)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        n = feats[0].shape[0]
        per_level = [
            torch.cat([box(x), cls(x)], 1).view(n, 4 * REG_MAX + self.nc, -1)
            for x, box, cls in zip(feats, self.box, self.cls, strict=True)
        ]
        raw = torch.cat(per_level, 2)  # [N, 4*bins + C, A]
        box_logits, class_logits = raw.split((4 * REG_MAX, self.nc), 1)
        if self.training:
            return box_logits.transpose(1, 2), class_logits.transpose(1, 2)
        dist = self.dfl(box_logits)  # [N, 4, A] ltrb in stride units
        lt, rb = dist.chunk(2, 1)
        x1y1 = self.anchors - lt
        x2y2 = self.anchors + rb
        boxes = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * self.stride_row
        return torch.cat([boxes, class_logits.sigmoid()], 1)


class DigitDetector(nn.Module):
    """Backbone + neck + head; eval output is YOLOv8's ``[N, 4 + C, A]`` in input pixels."""

    def __init__(self, size: int = IMAGE_SIZE, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.neck = Neck()
        self.head = DetectHead(WIDTHS[2:], num_classes, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.head(self.neck(self.backbone(x)))


def num_anchors(size: int = IMAGE_SIZE, strides: tuple[int, ...] = STRIDES) -> int:
    """Anchors in the output: the cells of every stride's grid."""
    return sum((size // s) ** 2 for s in strides)
