"""Detection metrics for YOLOv8-layout outputs: decode + NMS, mAP@0.5, F1 against a reference.

A rewrite of a detector is judged by what the task sees: boxes found, not tensor distance. A
YOLOv8 export has one output ``[N, 4 + C, A]`` (``cx, cy, w, h`` in input pixels, then ``C``
class scores in [0, 1]); some exports transpose it to ``[N, A, 4 + C]`` (``anchors_last=False``).

* ``decode``: per image the best class per anchor, a confidence threshold, class-aware greedy
  NMS, at most ``max_det`` boxes: ``[K, 6]`` rows ``x1, y1, x2, y2, score, cls``.
* ``map50``: VOC-style all-point-interpolated AP at IoU 0.5 per class present in the ground truth,
  averaged over those classes.
* ``detection_f1``: the original model's detections taken as ground truth for a candidate's,
  matched per image and class at IoU >= 0.5; 1.0 means the same boxes were found.

Pure numpy: usable inside a user metric without torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from rewriter.errors import DetectionError

Detections = list[np.ndarray]
IOU_THRESHOLD = 0.5


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[len(a), len(b)]`` of corner boxes (``x1, y1, x2, y2`` first columns)."""
    a = np.asarray(a, dtype=np.float64)[:, None, :4]
    b = np.asarray(b, dtype=np.float64)[None, :, :4]
    wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = np.prod(np.clip(a[..., 2:] - a[..., :2], 0, None), -1)
    area_b = np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), -1)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS; indices kept, highest score first (ties keep the earlier box)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        order = rest[box_iou(boxes[best : best + 1], boxes[rest])[0] <= iou]
    return np.asarray(keep, dtype=np.int64)


def _as_anchor_rows(output: np.ndarray, anchors_last: bool) -> np.ndarray:
    """``[N, A, 4 + C]`` view of a YOLOv8 output, after checking its layout."""
    array = np.asarray(output)
    if array.ndim != 3:
        raise DetectionError(
            f"detector output has shape {list(array.shape)}; expected 3 dims "
            f"({'[N, 4 + classes, anchors]' if anchors_last else '[N, anchors, 4 + classes]'})"
        )
    rows = array.transpose(0, 2, 1) if anchors_last else array
    if rows.shape[2] < 5:
        raise DetectionError(
            f"detector output has shape {list(array.shape)}: its feature axis holds "
            f"{rows.shape[2]} values, fewer than 4 box coordinates + 1 class score"
            + ("" if anchors_last else " (anchors_last=False reads [N, anchors, 4 + classes])")
        )
    if not np.isfinite(rows).all():
        raise DetectionError("detector output holds non-finite values (NaN or inf)")
    return rows


def decode(
    output: np.ndarray,
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 100,
    *,
    anchors_last: bool = True,
) -> Detections:
    """Boxes per image, ``[K, 6]`` float32 rows ``x1, y1, x2, y2, score, cls``, best first.

    ``output`` is ``[N, 4 + C, A]`` (``anchors_last=True``, a YOLOv8 export) or
    ``[N, A, 4 + C]``. Each anchor keeps its best class; scores ``>= conf`` survive, then NMS per
    class at ``iou``, then the ``max_det`` best.
    """
    rows = _as_anchor_rows(output, anchors_last)
    result: Detections = []
    for image in rows:
        cx, cy, w, h = (image[:, i].astype(np.float64) for i in range(4))
        scores_all = image[:, 4:]
        cls = scores_all.argmax(1)
        score = scores_all[np.arange(len(cls)), cls].astype(np.float64)
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        mask = score >= conf
        boxes, score, cls = boxes[mask], score[mask], cls[mask]
        kept: list[np.ndarray] = []
        for label in np.unique(cls):
            members = np.flatnonzero(cls == label)
            kept.append(members[nms(boxes[members], score[members], iou)])
        index = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
        index = index[np.argsort(-score[index], kind="stable")][:max_det]
        dets = np.concatenate([boxes[index], score[index, None], cls[index, None]], 1)
        result.append(dets.astype(np.float32).reshape(-1, 6))
    return result


def load_ground_truth(
    source: str | PathLike[str] | Mapping[str, np.ndarray], num_images: int | None = None
) -> list[np.ndarray]:
    """Per-image ground truth ``[M, 5]`` (``x1, y1, x2, y2, cls``) from an npz or a mapping.

    The source holds ``gt`` ``[M, 6]`` rows ``image_index, x1, y1, x2, y2, cls``; the number of
    images comes from ``num_images``, else from ``images``, else from the largest index.
    """
    name = str(source) if isinstance(source, str | PathLike) else "ground truth"
    if isinstance(source, str | PathLike):
        path = Path(source)
        if not path.is_file():
            raise DetectionError(f"{path}: ground-truth file not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                return load_ground_truth({key: data[key] for key in data.files}, num_images)
        except (OSError, ValueError) as error:
            raise DetectionError(f"{path}: not a readable npz file ({error})") from error
    if "gt" not in source:
        raise DetectionError(f"{name}: no 'gt' array (rows image, x1, y1, x2, y2, cls)")
    gt = np.asarray(source["gt"], dtype=np.float64)
    if gt.ndim != 2 or gt.shape[1] != 6:
        raise DetectionError(
            f"{name}: 'gt' has shape {list(gt.shape)}; expected [M, 6] rows "
            "image_index, x1, y1, x2, y2, cls"
        )
    if not np.isfinite(gt).all():
        raise DetectionError(f"{name}: 'gt' holds non-finite values")
    if num_images is None:
        if "images" in source:
            num_images = int(np.shape(source["images"])[0])
        else:
            num_images = int(gt[:, 0].max()) + 1 if len(gt) else 0
    index = gt[:, 0].astype(np.int64)
    if len(gt) and (index.min() < 0 or index.max() >= num_images):
        raise DetectionError(f"{name}: 'gt' image index outside [0, {num_images})")
    return [gt[index == i, 1:].astype(np.float32) for i in range(num_images)]


def _check_pairs(first: Sequence[np.ndarray], second: Sequence[np.ndarray], what: str) -> None:
    if len(first) != len(second):
        raise DetectionError(f"{what}: {len(first)} images against {len(second)}")


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP (VOC 2010+): area under the precision envelope."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def class_ap(
    detections: Sequence[np.ndarray], ground_truth: Sequence[np.ndarray], label: int,
    iou: float = IOU_THRESHOLD,
) -> float:
    """AP of one class: detections by falling score, each matched to its best-IoU box (VOC)."""
    truths = [g[g[:, 4] == label] for g in ground_truth]
    total = sum(len(t) for t in truths)
    entries = [(float(d[4]), i, d) for i, dets in enumerate(detections) for d in dets
               if int(d[5]) == label]
    entries.sort(key=lambda item: -item[0])
    used = [np.zeros(len(t), dtype=bool) for t in truths]
    hits = np.zeros(len(entries))
    for k, (_score, image, det) in enumerate(entries):
        if not len(truths[image]):
            continue
        overlaps = box_iou(det[None], truths[image])[0]
        best = int(overlaps.argmax())
        if overlaps[best] >= iou and not used[image][best]:
            used[image][best] = True
            hits[k] = 1.0
    tp = np.cumsum(hits)
    fp = np.cumsum(1.0 - hits)
    recall = tp / max(total, 1)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return average_precision(recall, precision)


def map50(detections: Sequence[np.ndarray], ground_truth: Sequence[np.ndarray]) -> float:
    """Mean over ground-truth classes of AP at IoU 0.5 (``detections`` from ``decode``)."""
    _check_pairs(detections, ground_truth, "map50: detections and ground truth")
    labels = np.unique(np.concatenate([g[:, 4] for g in ground_truth])) if ground_truth else []
    if not len(labels):
        raise DetectionError("map50: the ground truth holds no boxes")
    return float(np.mean([class_ap(detections, ground_truth, int(c)) for c in labels]))


def matched_pairs(reference: np.ndarray, candidate: np.ndarray, iou: float) -> int:
    """Candidates (by falling score) matched one-to-one to same-class reference boxes."""
    if not len(reference) or not len(candidate):
        return 0
    overlaps = box_iou(candidate, reference)
    overlaps[candidate[:, 5][:, None] != reference[:, 5][None, :]] = 0.0
    used = np.zeros(len(reference), dtype=bool)
    matches = 0
    for k in np.argsort(-candidate[:, 4], kind="stable"):
        row = np.where(used, 0.0, overlaps[k])
        best = int(row.argmax())
        if row[best] >= iou:
            used[best] = True
            matches += 1
    return matches


def detection_f1(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], iou: float = IOU_THRESHOLD
) -> float:
    """F1 of ``candidate``'s detections against ``reference``'s taken as truth (1.0: same).

    Both empty everywhere counts as perfect agreement.
    """
    _check_pairs(reference, candidate, "detection_f1: reference and candidate")
    n_ref = sum(len(r) for r in reference)
    n_cand = sum(len(c) for c in candidate)
    if n_ref + n_cand == 0:
        return 1.0
    matches = sum(matched_pairs(r, c, iou) for r, c in zip(reference, candidate, strict=True))
    return 2.0 * matches / (n_ref + n_cand)
