"""Detection metrics on hand-made boxes with known answers, and the shipped detector's mAP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rewriter.detection import (
    average_precision,
    decode,
    detection_f1,
    load_ground_truth,
    map50,
    nms,
)
from rewriter.errors import DetectionError

TRAINED = Path(__file__).resolve().parents[1] / "models" / "trained"


def yolo_output(anchors: list[tuple[float, float, float, float, list[float]]]) -> np.ndarray:
    """One image's ``[1, 4 + C, A]`` output from (cx, cy, w, h, class scores) per anchor."""
    rows = np.array([[cx, cy, w, h, *scores] for cx, cy, w, h, scores in anchors], np.float32)
    return rows.T[None]


def det(x1: float, y1: float, x2: float, y2: float, score: float, cls: int) -> list[float]:
    return [x1, y1, x2, y2, score, cls]


def image_dets(*rows: list[float]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(-1, 6)


def test_decode_converts_centre_boxes_and_thresholds():
    output = yolo_output([(20, 30, 10, 20, [0.1, 0.9]), (50, 50, 4, 4, [0.2, 0.1])])
    (dets,) = decode(output, conf=0.25)
    np.testing.assert_allclose(dets, [[15, 20, 25, 40, 0.9, 1]], rtol=1e-6)


def test_nms_is_class_aware_and_keeps_the_best():
    output = yolo_output([
        (20, 20, 10, 10, [0.8, 0.0]),  # overlaps the next one, lower score: suppressed
        (21, 20, 10, 10, [0.9, 0.0]),
        (20, 20, 10, 10, [0.0, 0.7]),  # same place, other class: kept
        (60, 60, 10, 10, [0.6, 0.0]),  # same class, no overlap: kept
    ])
    (dets,) = decode(output, conf=0.25, iou=0.45)
    assert dets[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert dets[:, 5].tolist() == [0, 1, 0]


def test_decode_accepts_anchor_major_layout_and_caps_detections():
    anchors = [(10.0 * i + 5, 5, 4, 4, [0.3 + 0.05 * i]) for i in range(6)]
    output = yolo_output(anchors)
    transposed = output.transpose(0, 2, 1)
    first = decode(output, max_det=3)
    second = decode(transposed, max_det=3, anchors_last=False)
    assert len(first[0]) == 3
    np.testing.assert_array_equal(first[0], second[0])
    assert first[0][0, 4] == pytest.approx(0.55)


def test_nms_keeps_higher_score_first():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [30, 30, 40, 40]], float)
    assert nms(boxes, np.array([0.5, 0.9, 0.1]), 0.45).tolist() == [1, 2]


def test_decode_rejects_wrong_layouts():
    with pytest.raises(DetectionError, match="3 dims"):
        decode(np.zeros((14, 10), np.float32))
    with pytest.raises(DetectionError, match="fewer than 4"):
        decode(np.zeros((1, 4, 10), np.float32))
    with pytest.raises(DetectionError, match="non-finite"):
        decode(np.full((1, 6, 3), np.nan, np.float32))


def test_map50_perfect_and_known_precision_recall_curve():
    truth = [np.array([[0, 0, 10, 10, 0], [20, 20, 30, 30, 0]], np.float32)]
    perfect = [image_dets(det(0, 0, 10, 10, 0.9, 0), det(20, 20, 30, 30, 0.8, 0))]
    assert map50(perfect, truth) == pytest.approx(1.0)
    # TP (0.9), FP (0.8), TP (0.7): precision 1 up to recall 0.5, 2/3 at recall 1.
    mixed = [image_dets(det(0, 0, 10, 10, 0.9, 0), det(50, 50, 60, 60, 0.8, 0),
                        det(20, 20, 30, 30, 0.7, 0))]
    assert map50(mixed, truth) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_map50_counts_duplicates_as_false_positives_and_averages_classes():
    truth = [np.array([[0, 0, 10, 10, 0], [20, 20, 30, 30, 1]], np.float32)]
    # Class 0 found once plus a lower-scored duplicate (AP 1), class 1 missed (AP 0).
    dets = [image_dets(det(0, 0, 10, 10, 0.9, 0), det(1, 0, 10, 10, 0.8, 0))]
    assert map50(dets, truth) == pytest.approx(0.5)
    # The duplicate ranked first does not hurt: it is the TP, the second box is the FP.
    assert map50([image_dets(det(0, 0, 10, 10, 0.9, 0))], truth) == pytest.approx(0.5)
    # A box of the wrong class is no match; a box below IoU 0.5 is no match.
    assert map50([image_dets(det(0, 0, 10, 10, 0.9, 1))], truth) == pytest.approx(0.0)
    assert map50([image_dets(det(5, 0, 15, 10, 0.9, 0))], truth) == pytest.approx(0.0)


def test_map50_across_images_ranks_globally():
    truth = [np.array([[0, 0, 10, 10, 3]], np.float32), np.array([[0, 0, 10, 10, 3]], np.float32)]
    # A false positive in image 1 outranks the true positive there: P = 1, 1/2, 2/3.
    dets = [image_dets(det(0, 0, 10, 10, 0.9, 3)),
            image_dets(det(40, 40, 50, 50, 0.8, 3), det(0, 0, 10, 10, 0.7, 3))]
    assert map50(dets, truth) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_average_precision_envelope():
    assert average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == (
        pytest.approx(0.5 + 0.5 * 2 / 3)
    )


def test_map50_rejects_empty_truth_and_mismatched_lengths():
    with pytest.raises(DetectionError, match="no boxes"):
        map50([image_dets()], [np.zeros((0, 5), np.float32)])
    with pytest.raises(DetectionError, match="1 images against 2"):
        map50([image_dets()], [np.zeros((0, 5), np.float32)] * 2)


def test_detection_f1_known_values():
    ref = [image_dets(*(det(20 * i, 0, 20 * i + 10, 10, 0.9, i) for i in range(4)))]
    assert detection_f1(ref, ref) == 1.0
    missing_one = [ref[0][:3]]
    assert detection_f1(ref, missing_one) == pytest.approx(2 * 3 / 7)
    relabelled = [ref[0].copy()]
    relabelled[0][0, 5] = 9
    assert detection_f1(ref, relabelled) == pytest.approx(2 * 3 / 8)
    shifted = [ref[0].copy()]
    shifted[0][:, [0, 2]] += 6  # IoU 4/16 with its reference: no match
    assert detection_f1(ref, shifted) == 0.0
    assert detection_f1([image_dets()], [image_dets()]) == 1.0
    assert detection_f1(ref, [image_dets()]) == 0.0


def test_detection_f1_matches_one_to_one():
    ref = [image_dets(det(0, 0, 10, 10, 0.9, 0))]
    doubled = [image_dets(det(0, 0, 10, 10, 0.9, 0), det(0, 0, 10, 10, 0.8, 0))]
    assert detection_f1(ref, doubled) == pytest.approx(2 * 1 / 3)


def test_load_ground_truth_from_npz_and_mapping(tmp_path):
    gt = np.array([[0, 1, 2, 3, 4, 5], [2, 5, 6, 7, 8, 1]], np.float32)
    images = np.zeros((3, 3, 8, 8), np.float32)
    path = tmp_path / "scenes.npz"
    np.savez(path, images=images, gt=gt)
    truth = load_ground_truth(path)
    assert [len(t) for t in truth] == [1, 0, 1]
    np.testing.assert_array_equal(truth[2], [[5, 6, 7, 8, 1]])
    assert len(load_ground_truth({"gt": gt})) == 3
    with pytest.raises(DetectionError, match=r"expected \[M, 6\]"):
        load_ground_truth({"gt": gt[:, :5]})
    with pytest.raises(DetectionError, match="not found"):
        load_ground_truth(tmp_path / "missing.npz")
    with pytest.raises(DetectionError, match="image index"):
        load_ground_truth({"gt": gt}, num_images=2)


@pytest.mark.slow
def test_shipped_detector_reaches_its_reported_map_in_onnxruntime():
    import onnxruntime as ort

    meta = json.loads((TRAINED / "detector.json").read_text())
    with np.load(TRAINED / "detector_test.npz") as data:
        images, gt = data["images"], data["gt"]
    session = ort.InferenceSession(str(TRAINED / "detector.onnx"),
                                   providers=["CPUExecutionProvider"])
    (output,) = session.run(["output0"], {"images": images})
    assert output.shape == (len(images), 14, meta["output"]["shape"][2])
    detections = decode(output)
    score = map50(detections, load_ground_truth({"images": images, "gt": gt}))
    assert score == pytest.approx(meta["test"]["map50"], abs=1e-6)
    assert score > 0.8
    confident = np.mean([(d[:, 4] >= 0.5).sum() for d in detections])
    assert confident >= 2.0  # several confident boxes per image: F1 is a sensitive metric
    assert detection_f1(detections, decode(output)) == 1.0
