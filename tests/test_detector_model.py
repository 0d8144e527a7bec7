"""The detector network, its synthetic scenes and its assigner (the parts training relies on)."""

from __future__ import annotations

import numpy as np
import torch

from models.detector import IMAGE_SIZE, DigitDetector, num_anchors
from models.detector_data import make_scenes
from models.train_detector import DetectionLoss, assign, pad_targets


def test_eval_output_has_the_yolov8_layout():
    torch.manual_seed(0)
    model = DigitDetector().eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert out.shape == (2, 14, num_anchors()) and num_anchors() == 189
    assert (out[:, 2:4] >= 0).all() and ((out[:, 4:] >= 0) & (out[:, 4:] <= 1)).all()
    # Box centres stay near their anchor: the first anchor is the top-left stride-8 cell.
    assert abs(float(out[0, 0, 0]) - 4.0) < 8 * 8


def test_training_output_is_raw_per_anchor():
    model = DigitDetector().train()
    box, cls = model(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert box.shape == (2, 189, 32) and cls.shape == (2, 189, 10)


def test_scenes_are_seeded_and_boxes_lie_inside():
    a, b = make_scenes(6, seed=3), make_scenes(6, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.gt, b.gt)
    assert a.images.dtype == np.float32 and 0 <= a.images.min() and a.images.max() <= 1
    boxes = a.gt[:, 1:5]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= IMAGE_SIZE).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    assert set(np.unique(a.gt[:, 0]).astype(int)) == set(range(6))
    assert not np.array_equal(make_scenes(6, seed=4).images, a.images)


def test_assigner_picks_anchors_inside_each_box_with_its_class():
    loss = DetectionLoss()
    gt = torch.tensor([[0, 10, 10, 40, 40, 3], [1, 60, 60, 90, 90, 7]], dtype=torch.float32)
    targets, mask = pad_targets(gt, 2)
    scores = torch.full((2, 189, 10), 0.5)
    boxes = torch.tensor([10, 10, 40, 40], dtype=torch.float32).expand(2, 189, 4).clone()
    boxes[1] = torch.tensor([60, 60, 90, 90], dtype=torch.float32)
    foreground, target_boxes, class_targets = assign(scores, boxes, loss.points, targets, mask)
    assert 0 < int(foreground[0].sum()) <= 10 and 0 < int(foreground[1].sum()) <= 10
    points = loss.points[foreground[0]]
    assert ((points >= 10) & (points <= 40)).all()
    assert (class_targets[0][foreground[0]].argmax(-1) == 3).all()
    assert (class_targets[1][foreground[1]].argmax(-1) == 7).all()
    assert (class_targets[0][~foreground[0]] == 0).all()
    assert torch.allclose(target_boxes[1][foreground[1]], torch.tensor([60.0, 60, 90, 90]))
