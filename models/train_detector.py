"""Train the digit detector deterministically on CPU and ship it to ``models/trained/``.

``python -m models.train_detector`` trains ``models.detector.DigitDetector`` on fresh seeded
synthetic scenes every epoch (``models.detector_data``), keeps an EMA of the weights (as YOLOv8
does), then writes:

* ``detector.onnx``: input ``images`` ``[N, 3, 96, 96]`` float32 in [0, 1], output ``output0``
  ``[N, 14, 189]`` (cx, cy, w, h in pixels, then 10 sigmoid class scores), opset 17, BatchNorm
  kept (exported with constant folding off), checked with ``onnx.checker`` (full check) and
  compared with torch under onnxruntime.
* ``detector_calib.npz``: ``images`` and ``gt`` of scenes from the train digits (unseen seed).
* ``detector_test.npz``: ``images`` and ``gt`` of scenes from the held-out digits.
* ``detector.json``: how it was made and its metrics (mAP@0.5 measured in onnxruntime).

The loss is YOLOv8's, reduced: a task-aligned assigner (top-k anchors inside each box ranked
by ``score**0.5 * IoU**6``), BCE on classes against the IoU-aware target, GIoU and DFL on boxes.
``--checkpoint`` saves/loads the trained weights so export can be redone without retraining.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from models.detector import IMAGE_SIZE, NUM_CLASSES, REG_MAX, STRIDES, WIDTHS, DigitDetector
from models.detector_data import Scenes, make_scenes
from models.export import batch_axes, export_module, max_relative_error, run_onnx
from models.zoo import count_macs

SEED = 0
OPSET = 17
EPOCHS = 16
SCENES_PER_EPOCH = 1024
BATCH = 32
CALIB_SIZE = 128
TEST_SIZE = 200
CALIB_SEED, TEST_SEED = 10_001, 20_002
TOPK, ALPHA, BETA = 10, 0.5, 6.0
BOX_GAIN, CLS_GAIN, DFL_GAIN = 7.5, 0.5, 1.5

TRAINED_DIR = Path(__file__).resolve().parent / "trained"
ONNX_NAME, CALIB_NAME, TEST_NAME, META_NAME = (
    "detector.onnx", "detector_calib.npz", "detector_test.npz", "detector.json",
)


# --------------------------------------------------------------------------- boxes


def ltrb_to_xyxy(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """Distances ``[..., 4]`` from anchor points ``[..., 2]`` to corner boxes ``[..., 4]``."""
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)


def box_iou(a: torch.Tensor, b: torch.Tensor, giou: bool = False) -> torch.Tensor:
    """IoU (or GIoU) of broadcastable corner boxes ``[..., 4]``."""
    inter_wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2]))
    inter = inter_wh.clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter + 1e-7
    iou = inter / union
    if not giou:
        return iou
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2]))
    hull_area = hull.clamp(min=0).prod(-1) + 1e-7
    return iou - (hull_area - union) / hull_area


# --------------------------------------------------------------------------- loss


def pad_targets(gt: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[M, 6]`` (image, box, cls) to padded ``[B, Mmax, 5]`` (cls, box) and a mask."""
    counts = torch.bincount(gt[:, 0].long(), minlength=batch)
    width = max(int(counts.max()) if len(gt) else 0, 1)
    padded = torch.zeros(batch, width, 5)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for image in range(batch):
        rows = gt[gt[:, 0] == image]
        padded[image, : len(rows), 0] = rows[:, 5]
        padded[image, : len(rows), 1:] = rows[:, 1:5]
        mask[image, : len(rows)] = True
    return padded, mask


@torch.no_grad()
def assign(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    points: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task-aligned assignment (YOLOv8's TAL, without its corner cases).

    ``scores`` ``[B, A, C]`` (sigmoid), ``boxes`` ``[B, A, 4]`` pixels, ``points`` ``[A, 2]``
    pixels, ``targets`` ``[B, M, 5]``. Returns foreground mask ``[B, A]``, target boxes
    ``[B, A, 4]`` and IoU-aware class targets ``[B, A, C]``.
    """
    gt_boxes, gt_cls = targets[..., 1:], targets[..., 0].long()
    # Candidates: anchor points inside the box, grown to at least 8 px so thin digits get one.
    centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
    half = ((gt_boxes[..., 2:] - gt_boxes[..., :2]) / 2).clamp(min=4.0)
    offset = (points[None, None] - centre[:, :, None]).abs()  # [B, M, A, 2]
    inside = (offset < half[:, :, None]).all(-1) & mask[..., None]
    iou = box_iou(gt_boxes[:, :, None], boxes[:, None]).clamp(min=0)  # [B, M, A]
    cls_score = torch.gather(scores.transpose(1, 2), 1, gt_cls[..., None].expand(-1, -1,
                             scores.shape[1]))  # [B, M, A]
    align = cls_score.pow(ALPHA) * iou.pow(BETA) * inside
    top = align.topk(min(TOPK, align.shape[-1]), -1).indices
    chosen = torch.zeros_like(inside).scatter_(-1, top, True) & inside
    # An anchor claimed by several boxes goes to the one it overlaps most.
    claims = chosen.sum(1)
    best = torch.where(chosen, iou, torch.full_like(iou, -1.0)).argmax(1)  # [B, A]
    multiple = claims > 1
    one_hot = F.one_hot(best, chosen.shape[1]).transpose(1, 2).bool()
    chosen = torch.where(multiple[:, None], one_hot & chosen, chosen)
    foreground = chosen.any(1)
    owner = chosen.float().argmax(1)  # [B, A]
    target_boxes = torch.gather(gt_boxes, 1, owner[..., None].expand(-1, -1, 4))
    target_cls = torch.gather(gt_cls, 1, owner)
    align = align * chosen
    norm = align / (align.amax(-1, keepdim=True) + 1e-9) * (iou * chosen).amax(-1, keepdim=True)
    weight = norm.amax(1) * foreground  # [B, A]
    class_targets = F.one_hot(target_cls, scores.shape[-1]).float() * weight[..., None]
    return foreground, target_boxes, class_targets


class DetectionLoss:
    """YOLOv8-style loss on the head's training outputs."""

    def __init__(self, size: int = IMAGE_SIZE, strides: Sequence[int] = STRIDES) -> None:
        model_head = DigitDetector(size).head
        self.points = (model_head.anchors * model_head.stride_row).t()  # [A, 2] pixels
        self.stride = model_head.stride_row[0]  # [A]
        self.bins = torch.arange(REG_MAX, dtype=torch.float32)

    def __call__(
        self, box_logits: torch.Tensor, class_logits: torch.Tensor, gt: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        batch, anchors, _ = box_logits.shape
        dist_logits = box_logits.view(batch, anchors, 4, REG_MAX)
        ltrb = dist_logits.softmax(-1) @ self.bins  # [B, A, 4] stride units
        pred_boxes = ltrb_to_xyxy(self.points, ltrb * self.stride[None, :, None])
        targets, mask = pad_targets(gt, batch)
        foreground, target_boxes, class_targets = assign(
            class_logits.detach().sigmoid(), pred_boxes.detach(), self.points, targets, mask
        )
        norm = class_targets.sum().clamp(min=1.0)
        cls_loss = F.binary_cross_entropy_with_logits(class_logits, class_targets,
                                                      reduction="sum") / norm
        if foreground.any():
            weight = class_targets.sum(-1)[foreground]
            giou = box_iou(pred_boxes[foreground], target_boxes[foreground], giou=True)
            box_loss = ((1.0 - giou) * weight).sum() / norm
            stride = self.stride[None, :, None].expand(batch, -1, 1)[foreground]
            points = self.points[None].expand(batch, -1, -1)[foreground]
            tb = target_boxes[foreground]
            target_ltrb = torch.cat([points - tb[:, :2], tb[:, 2:] - points], -1) / stride
            target_ltrb = target_ltrb.clamp(0, REG_MAX - 1 - 0.01)
            dfl = _dfl(dist_logits[foreground], target_ltrb)
            dfl_loss = (dfl.mean(-1) * weight).sum() / norm
        else:
            box_loss = dfl_loss = class_logits.sum() * 0.0
        total = BOX_GAIN * box_loss + CLS_GAIN * cls_loss + DFL_GAIN * dfl_loss
        parts = {"box": box_loss.item(), "cls": cls_loss.item(), "dfl": dfl_loss.item()}
        return total * batch, parts


def _dfl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution focal loss: cross-entropy to the two bins around each target distance."""
    left = target.long()
    right = left + 1
    w_left = right.float() - target
    log_probs = logits.log_softmax(-1)
    return -(log_probs.gather(-1, left[..., None])[..., 0] * w_left
             + log_probs.gather(-1, right[..., None])[..., 0] * (1 - w_left))


# --------------------------------------------------------------------------- training


class EMA:
    """Exponential moving average of weights and buffers, with YOLOv8's warm-up ramp."""

    def __init__(self, model: nn.Module, decay: float = 0.999, tau: float = 500.0) -> None:
        self.model = copy.deepcopy(model).eval()
        self.decay, self.tau, self.updates = decay, tau, 0
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        source = model.state_dict()
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[name].detach(), alpha=1 - d)


def train(
    model: DigitDetector,
    *,
    epochs: int = EPOCHS,
    scenes_per_epoch: int = SCENES_PER_EPOCH,
    batch_size: int = BATCH,
    lr: float = 2e-3,
    seed: int = SEED,
) -> DigitDetector:
    """Train on fresh seeded scenes each epoch; return the EMA model (eval mode)."""
    loss_fn = DetectionLoss()
    steps = epochs * math.ceil(scenes_per_epoch / batch_size)
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999),
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps,
                                                   pct_start=0.1)
    ema = EMA(model)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        scenes = make_scenes(scenes_per_epoch, seed=seed * 1000 + epoch, split="train")
        images, gt = torch.from_numpy(scenes.images), torch.from_numpy(scenes.gt)
        order = torch.randperm(len(images), generator=generator)
        sums = {"box": 0.0, "cls": 0.0, "dfl": 0.0}
        batches = order.split(batch_size)
        for batch in batches:
            rows = gt[torch.isin(gt[:, 0].long(), batch)]
            remap = torch.full((len(images),), -1, dtype=torch.long)
            remap[batch] = torch.arange(len(batch))
            rows = torch.cat([remap[rows[:, :1].long()].float(), rows[:, 1:]], 1)
            box_logits, class_logits = model(images[batch])
            loss, parts = loss_fn(box_logits, class_logits, rows)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            schedule.step()
            ema.update(model)
            for key, value in parts.items():
                sums[key] += value / len(batches)
        elapsed = time.perf_counter() - start
        losses = "  ".join(f"{k} {v:.3f}" for k, v in sums.items())
        print(f"epoch {epoch + 1:2d}/{epochs}  {losses}  {elapsed:.0f}s", flush=True)
    return ema.model.eval()


# --------------------------------------------------------------------------- artifacts


def export_detector(model: DigitDetector, path: Path, example: np.ndarray) -> float:
    """Export with BatchNorm kept, full-check it, and return onnxruntime-vs-torch rel. error."""
    export_module(
        model, torch.from_numpy(example), path, opset=OPSET, input_names=("images",),
        output_names=("output0",), dynamic_axes=batch_axes(("images", "output0")),
    )
    onnx.checker.check_model(str(path), full_check=True)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(example)).numpy()
    (actual,) = run_onnx(path, {"images": example})
    return max_relative_error(actual, expected)


def evaluate_onnx(path: Path, scenes: Scenes) -> dict[str, float]:
    """mAP@0.5 and detection statistics of an ONNX detector under onnxruntime."""
    from rewriter import detection

    (output,) = run_onnx(path, {"images": scenes.images})
    detections = detection.decode(output)
    truth = detection.load_ground_truth({"images": scenes.images, "gt": scenes.gt})
    confident = [int((d[:, 4] >= 0.5).sum()) for d in detections]
    return {
        "map50": detection.map50(detections, truth),
        "detections_per_image": float(np.mean([len(d) for d in detections])),
        "confident_0.5_per_image": float(np.mean(confident)),
        "ground_truth_per_image": len(scenes.gt) / len(scenes.images),
    }


def write_artifacts(model: DigitDetector, out_dir: Path, meta: dict) -> dict:
    """Export the model and the data files into ``out_dir``; return the metadata written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = make_scenes(CALIB_SIZE, CALIB_SEED, split="train")
    test = make_scenes(TEST_SIZE, TEST_SEED, split="test")
    onnx_path = out_dir / ONNX_NAME
    error = export_detector(model, onnx_path, test.images[:4])
    np.savez_compressed(out_dir / CALIB_NAME, images=calib.images, gt=calib.gt)
    np.savez_compressed(out_dir / TEST_NAME, images=test.images, gt=test.gt)
    meta = {
        **meta,
        "test": evaluate_onnx(onnx_path, test),
        "calibration": evaluate_onnx(onnx_path, calib),
        "onnxruntime_vs_torch_max_rel_error": error,
        "input": {"name": "images", "shape": ["batch", 3, IMAGE_SIZE, IMAGE_SIZE],
                  "dtype": "float32", "range": [0, 1]},
        "output": {"name": "output0", "shape": ["batch", 4 + NUM_CLASSES, int(
            model.head.anchors.shape[1])], "rows": "cx, cy, w, h (input pixels), 10 sigmoid "
            "class scores"},
        "data": {"calibration": {"images": CALIB_SIZE, "seed": CALIB_SEED, "digits": "train"},
                 "test": {"images": TEST_SIZE, "seed": TEST_SEED, "digits": "test"},
                 "scenes": "models.detector_data: sklearn digits on photo/noise backgrounds"},
        "opset": OPSET,
        "batchnorm": "kept as BatchNormalization nodes (exported with do_constant_folding=False)",
        "architecture": {"widths": list(WIDTHS), "strides": list(STRIDES), "reg_max": REG_MAX,
                         "blocks": "Conv+BN+SiLU, C2f, FPN/PAN, decoupled heads, DFL"},
        "params": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, (1, 3, IMAGE_SIZE, IMAGE_SIZE)),
        "torch_version": torch.__version__,
    }
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    """Train (or load ``--checkpoint``) the detector and write its export, data and metadata."""
    parser = argparse.ArgumentParser(prog="python -m models.train_detector", description=__doc__)
    parser.add_argument("-o", "--output-dir", type=Path, default=TRAINED_DIR)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--scenes-per-epoch", type=int, default=SCENES_PER_EPOCH)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=2, help="fixed for reproducibility")
    parser.add_argument("--checkpoint", type=Path, help="save trained weights here, or load "
                        "them from here (skipping training) if the file exists")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    model = DigitDetector()
    meta: dict = {"seed": args.seed, "epochs": args.epochs,
                  "scenes_per_epoch": args.scenes_per_epoch, "batch": BATCH}
    if args.checkpoint and args.checkpoint.exists():
        saved = torch.load(args.checkpoint)
        model.load_state_dict(saved["state"])
        meta.update(saved["meta"])
        model.eval()
    else:
        start = time.perf_counter()
        model = train(model, epochs=args.epochs, scenes_per_epoch=args.scenes_per_epoch,
                      seed=args.seed)
        meta["train_seconds"] = round(time.perf_counter() - start, 1)
        if args.checkpoint:
            torch.save({"state": model.state_dict(), "meta": meta}, args.checkpoint)
        print(f"trained in {meta['train_seconds']:.0f}s", flush=True)
    meta = write_artifacts(model, args.output_dir, meta)
    print(f"test mAP@0.5 (onnxruntime): {meta['test']['map50']:.4f}  "
          f"({meta['macs'] / 1e6:.1f}M MACs, {meta['params']} params)")


if __name__ == "__main__":
    main()
