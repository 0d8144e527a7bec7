"""Output groups and task fidelity: the automatic rule, the user syntax, the worst-group error."""

from __future__ import annotations

import numpy as np
import pytest

from rewriter.errors import UsageError
from rewriter.fidelity import flip_rate, smooth_flip_rate, task_error, task_fidelity
from rewriter.groups import (
    OutputGroup,
    bind_groups,
    coerce_groups,
    find_groups,
    format_groups,
    parse_groups,
)


def detector_output(n: int = 8, classes: int = 10, anchors: int = 400, seed: int = 0,
                    transposed: bool = False) -> np.ndarray:
    """A YOLOv8-like `[N, 4 + C, A]` output: box pixels (cx, cy, w, h), then sigmoid scores."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0, 320, size=(n, 2, anchors))
    sizes = rng.uniform(8, 120, size=(n, 2, anchors))
    logits = rng.normal(-6.0, 2.0, size=(n, classes, anchors))
    logits[:, :, :20] += 8.0  # a few confident anchors per image
    out = np.concatenate([centers, sizes, 1 / (1 + np.exp(-logits))], axis=1).astype(np.float32)
    return out.transpose(0, 2, 1).copy() if transposed else out


def test_yolo_layout_gives_box_rows_and_score_rows():
    groups = find_groups({"output0": detector_output()})
    assert [(g.name, g.axis, g.start, g.stop, g.kind) for g in groups] == [
        ("value", 1, 0, 4, "value"),
        ("score", 1, 4, 14, "score"),
    ]
    assert [g.label for g in groups] == ["output0:value", "output0:score"]


def test_transposed_detector_layout_splits_the_last_axis():
    groups = find_groups({"output0": detector_output(transposed=True)})
    assert [(g.axis, g.start, g.stop, g.kind) for g in groups] == [
        (2, 0, 4, "value"),
        (2, 4, 14, "score"),
    ]


def pose_output(n: int = 8, keypoints: int = 17, anchors: int = 400, seed: int = 0) -> np.ndarray:
    """A YOLOv8-pose-like `[N, 4 + 1 + K*3, A]` output: box pixels, person score, then (x, y,
    visibility) per keypoint: pixels interleaved with sigmoids."""
    rng = np.random.default_rng(seed)
    head = detector_output(n, classes=1, anchors=anchors, seed=seed)
    triples = np.empty((n, keypoints, 3, anchors))
    triples[:, :, :2] = rng.uniform(0, 320, size=(n, keypoints, 2, anchors))
    triples[:, :, 2] = 1 / (1 + np.exp(-rng.normal(0, 3, size=(n, keypoints, anchors))))
    return np.concatenate([head, triples.reshape(n, keypoints * 3, anchors)], 1).astype(np.float32)


def test_interleaved_keypoints_get_a_strided_group_per_coordinate():
    """Seventeen (x, y, visibility) triples are 35 runs: without strides the output fell back to
    one whole-tensor group, where pixels drown the person score (the trap groups exist for)."""
    out = pose_output()
    groups = find_groups({"output0": out})
    assert [(g.name, g.start, g.stop, g.step, g.kind) for g in groups] == [
        ("value1", 0, 4, 1, "value"), ("score1", 4, 5, 1, "score"),
        ("value2", 5, 54, 3, "value"), ("value3", 6, 55, 3, "value"),
        ("score2", 7, 56, 3, "score")]
    assert [g.rows for g in groups] == ["0-3", "4", "5-53%3", "6-54%3", "7-55%3"]
    np.testing.assert_array_equal(groups[4].select(out), out[:, 7::3])
    assert parse_groups(format_groups(groups)) == groups
    bound = bind_groups(parse_groups("output0:kx=5-53%3+person=4"), {"output0": out})
    assert [(g.name, g.rows, g.kind) for g in bound[:4]] == [
        ("rest1", "0-3", "value"), ("person", "4", "score"), ("kx", "5-53%3", "value"),
        ("rest2", "6", "value")]
    covered = sorted(r for g in bound for r in g.indices())
    assert covered == list(range(out.shape[1]))  # every row measured exactly once
    box_only = bind_groups(parse_groups("output0:box=0-3"), {"output0": out})
    assert [(g.name, g.rows) for g in box_only] == [
        ("box", "0-3"), ("rest1", "4"), ("rest2", "5-53%3"), ("rest3", "6-54%3"),
        ("rest4", "7-55%3")]  # the rest of the rows found as the automatic rule finds them
    # Four keypoint pairs without visibility are plain runs; a tail that breaks its pattern
    # (or has no score run before it) keeps the whole-output fallback.
    broken = out.copy()
    broken[:, 30] = 0.5  # one x row turned bounded
    assert [g.axis for g in find_groups({"output0": broken})] == [None]
    # Visibility as raw logits (unbounded, ~100x smaller than the pixels): the same strides.
    logits = out.copy()
    logits[:, 7::3] = np.random.default_rng(5).normal(0, 3, size=logits[:, 7::3].shape)
    assert [(g.rows, g.kind) for g in find_groups({"output0": logits})][2:] == [
        ("5-53%3", "value"), ("6-54%3", "value"), ("7-55%3", "value")]


def test_unbounded_rows_of_different_scale_are_split():
    rng = np.random.default_rng(1)
    pixels = rng.normal(0, 300, size=(4, 2, 50))
    offsets = rng.normal(0, 1.0, size=(4, 3, 50))
    groups = find_groups({"y": np.concatenate([pixels, offsets], axis=1)})
    assert [(g.name, g.start, g.stop) for g in groups] == [("value1", 0, 2), ("value2", 2, 5)]


def test_uniform_and_small_outputs_are_one_group():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(16, 10)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    groups = find_groups({"logits": logits, "probs": probs, "n": np.array([3.0])})
    assert [(g.label, g.axis, g.kind) for g in groups] == [
        ("logits", None, "value"),
        ("probs", None, "score"),
        ("n", None, "value"),
    ]


def test_parse_user_groups_round_trips():
    groups = parse_groups("output0:box=0-3+cls=4-13/score")
    assert groups == [
        OutputGroup("output0", "box", 1, 0, 4, "value", kind_from_data=True),
        OutputGroup("output0", "cls", 1, 4, 14, "score"),
    ]
    two = parse_groups("a:axis=2+x=0-1,b:y=5")
    assert [(g.output, g.axis, g.start, g.stop) for g in two] == [("a", 2, 0, 2), ("b", 1, 5, 6)]
    auto = find_groups({"output0": detector_output()})
    assert parse_groups(format_groups(auto)) == auto
    assert coerce_groups(["output0:box=0-3", auto[1]])[1] == auto[1]


@pytest.mark.parametrize(
    "text, message",
    [
        ("box=0-3", "expected OUTPUT:NAME"),
        ("out:box=3-0", "ends before it starts"),
        ("out:box=0-3+cls=3-5", "overlap"),
        ("out:box", "is not NAME=START-STOP"),
        ("out:box=0-3|cls=4-13", "is not NAME=START-STOP"),
        ("out:axis=0+box=0-3", "sample axis"),
        ("out:box=0-1+box=2-3", "given twice"),
        ("out:x=0-6%3+y=3", "'x' and 'y' overlap"),
        ("out:x=0-6%0", "is not NAME=START-STOP"),
    ],
)
def test_bad_group_text_names_the_problem(text, message):
    with pytest.raises(UsageError, match=message):
        parse_groups(text)


def test_bind_reads_kind_off_data_and_covers_the_rest():
    ref = {"output0": detector_output(), "other": np.ones((8, 3))}
    bound = bind_groups(parse_groups("output0:cls=4-13"), ref)
    assert [(g.label, g.start, g.stop, g.kind) for g in bound] == [
        ("output0:rest1", 0, 4, "value"),
        ("output0:cls", 4, 14, "score"),
        ("other", 0, None, "score"),
    ]
    with pytest.raises(UsageError, match="no output 'nope'"):
        bind_groups(parse_groups("nope:x=0-1"), ref)
    with pytest.raises(UsageError, match="past output 'output0'"):
        bind_groups(parse_groups("output0:x=0-14"), ref)


def test_flip_rate_counts_over_the_union_only():
    ref = np.zeros(1000)
    got = np.zeros(1000)
    ref[:10] = 0.9
    got[:9] = 0.9  # one of ten detections lost among 990 background positions
    rate, union = flip_rate(ref, got, 0.5)
    assert union == 10 and rate == pytest.approx(0.1)
    assert flip_rate(ref, ref, 0.5) == (0.0, 10)
    assert flip_rate(np.zeros(5), np.zeros(5), 0.5) == (0.0, 0)


def test_smooth_flips_count_whole_flips_as_one_and_drift_towards_the_threshold_in_part():
    ref = np.zeros(1000)
    ref[:10] = 0.9
    lost = ref.copy()
    lost[0] = 0.0  # a whole flip, far from the threshold: the same as flip_rate
    assert smooth_flip_rate(ref, lost, 0.5) == pytest.approx(flip_rate(ref, lost, 0.5))
    drift = ref.copy()
    drift[:10] = 0.52  # ten scores slid to just above 0.5: no flip yet, most of the way there
    assert flip_rate(ref, drift, 0.5)[0] == 0.0
    rate, union = smooth_flip_rate(ref, drift, 0.5)
    assert union == 10 and rate == pytest.approx(1.0 - 0.7)  # ramp(0.9) = 1, ramp(0.52) = 0.7
    assert smooth_flip_rate(ref, ref, 0.5) == (0.0, 10)
    assert smooth_flip_rate(np.zeros(5), np.zeros(5), 0.5) == (0.0, 0)
    near = ref.copy()
    near[:10] = 0.54
    slid = near.copy()
    slid[:10] = 0.51  # a 6% drift just above the threshold: tiny as a tensor, close to flipping
    whole = task_error({"y": near[None]}, {"y": slid[None]})
    smooth = task_error({"y": near[None]}, {"y": slid[None]}, smooth=True)
    assert whole < 0.002 and smooth == pytest.approx(0.25 * 0.3)  # FLIP_WEIGHT x (0.9 - 0.6)


def _perturb_scores(ref: np.ndarray, seed: int = 3) -> np.ndarray:
    """Lose a share of the confident class decisions; boxes untouched."""
    got = ref.copy()
    confident = np.argwhere(got[:, 4:, :] > 0.5)
    rng = np.random.default_rng(seed)
    lost = confident[rng.choice(len(confident), size=len(confident) // 10, replace=False)]
    got[lost[:, 0], lost[:, 1] + 4, lost[:, 2]] = 0.1
    return got


def test_lost_scores_dominate_task_error_while_whole_tensor_cosine_passes():
    ref = detector_output()
    got = _perturb_scores(ref)
    fid = task_fidelity({"output0": ref}, {"output0": got})
    whole = fid["whole_tensor"]["outputs"]["output0"]["cosine"]
    assert whole > 0.9997  # the whole tensor sees nothing
    assert fid["worst"]["group"] == "output0:score"
    assert fid["groups"]["output0:value"]["cosine"] == 1.0
    assert fid["flip@0.5"] >= 0.05
    assert fid["task_error"] >= 0.02 > 1 - 0.99
    assert task_error({"output0": ref}, {"output0": got}) == pytest.approx(fid["task_error"])
    assert fid["samples"] == 8 and fid["groups"]["output0:score"]["samples"] == 8
    assert fid["groups"]["output0:score"]["decisions@0.5"] > 0


def test_identical_outputs_are_exact():
    ref = {"output0": detector_output()}
    fid = task_fidelity(ref, ref)
    assert fid["task_error"] == 0.0 and fid["cosine"] == 1.0 and fid["flip@0.25"] == 0.0
    assert task_error(ref, ref) == 0.0


def test_scale_drift_counts_though_cosine_is_one():
    ref = {"y": np.random.default_rng(4).normal(size=(8, 16))}
    fid = task_fidelity(ref, {"y": ref["y"] * 0.7})
    assert fid["cosine"] == pytest.approx(1.0)
    assert fid["task_error"] == pytest.approx(0.3**2 / 2)


def test_classifier_outputs_keep_agreement_and_accuracy():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(20, 4))
    labels = np.argmax(logits, axis=1)
    fid = task_fidelity({"logits": logits}, {"logits": logits + 0.01}, labels=labels)
    assert fid["top1_agreement"] == 1.0 and fid["accuracy_before"] == 1.0
    assert fid["outputs"]["logits"]["top1_agreement"] == 1.0
    assert list(fid["groups"]) == ["logits"]


def test_a_lost_person_score_is_the_worst_group_of_a_pose_output():
    """On a pose output the person-score row is 1 of 56 and tiny beside the pixels: losing a
    tenth of its confident decisions must still read as the worst group."""
    ref = pose_output()
    got = ref.copy()
    confident = np.argwhere(got[:, 4, :] > 0.5)
    lost = confident[:: 10]
    got[lost[:, 0], 4, lost[:, 1]] = 0.1
    fid = task_fidelity({"output0": ref}, {"output0": got})
    assert fid["whole_tensor"]["outputs"]["output0"]["cosine"] > 0.9999
    assert fid["worst"]["group"] == "output0:score1"
    assert fid["task_error"] >= 0.02 > 1 - 0.99


def test_normalised_boxes_beside_scores_are_their_own_group():
    """DETR-style `[N, queries, 4 + C]`: boxes in [0, 1] are bounded like the scores, but dense
    (median ~0.5) where scores are sparse; in one group they would drown the class decisions."""
    rng = np.random.default_rng(4)
    boxes = rng.uniform(0.05, 0.95, size=(8, 300, 4))
    logits = rng.normal(-5.0, 2.0, size=(8, 300, 20))
    logits[:, :15] += 8.0  # a few confident queries per image
    out = np.concatenate([boxes, 1 / (1 + np.exp(-logits))], axis=2).astype(np.float32)
    groups = find_groups({"pred": out})
    assert [(g.name, g.axis, g.start, g.stop, g.kind) for g in groups] == [
        ("score1", 2, 0, 4, "score"), ("score2", 2, 4, 24, "score")]
    got = out.copy()
    confident = np.argwhere(got[..., 4:] > 0.5)
    lost = confident[::10]
    got[lost[:, 0], lost[:, 1], lost[:, 2] + 4] = 0.1
    fid = task_fidelity({"pred": out}, {"pred": got})
    assert fid["worst"]["group"] == "pred:score2" and fid["task_error"] >= 0.02
    # An untrained model's scores (medians between 0.01 and 0.1) do not split: no fragments.
    vague = out.copy()
    vague[..., 4:] = 1 / (1 + np.exp(-rng.normal(-3.0, 1.0, size=(8, 300, 20))))
    assert [(g.axis, g.kind) for g in find_groups({"pred": vague})] == [(None, "score")]


def test_a_background_class_beside_a_rare_class_is_split_off():
    """A face detector's softmax `[N, A, 2]` (background, face): the background row is above 0.5
    almost everywhere, so in one group its decisions would dilute a lost face to nothing."""
    rng = np.random.default_rng(6)
    logit = rng.normal(-3.5, 1.0, size=(8, 500))
    logit[:, :10] += 7.0  # a few faces per image
    face = 1 / (1 + np.exp(-logit))
    out = np.stack([1 - face, face], axis=2).astype(np.float32)
    assert 0.01 < np.median(face) < 0.1  # not clearly sparse: only the always-on rule splits
    groups = find_groups({"scores": out})
    assert [(g.start, g.stop, g.kind) for g in groups] == [(0, 1, "score"), (1, 2, "score")]
    got = out.copy()
    got[:4, :10] = out[:4, :10][..., ::-1]  # four images lose their faces (and gain background)
    fid = task_fidelity({"scores": out}, {"scores": got})
    assert fid["worst"]["group"] == "scores:score2" and fid["flip@0.5"] >= 0.3
