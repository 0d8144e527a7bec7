"""Image-folder calibration: letterbox/stretch/crop, seeded flips and scale jitter, streaming."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rewriter import runtime
from rewriter.calibration import InputSpec, load_calibration
from rewriter.errors import CalibrationError
from rewriter.images import ImageSamples, load_image_folder, parse_preprocess
from tests.builders import conv_model

SPEC = [InputSpec("x", np.dtype(np.float32), (None, 3, 16, 16))]


def _folder(tmp_path, count: int = 3, shape=(20, 40)):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png")
    return folder


def test_letterbox_keeps_the_aspect_and_pads_with_yolo_grey(tmp_path):
    folder = _folder(tmp_path, 1, (20, 40))  # 1:2, so 8 rows of picture in a 16x16 canvas
    x = np.asarray(load_image_folder(folder, SPEC, "resize=letterbox").inputs["x"])
    assert x.shape == (1, 3, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, :4], 114 / 255, rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 12:], 114 / 255, rtol=1e-6)
    assert np.abs(x[0, :, 4:12] - 114 / 255).max() > 0.2  # the picture itself
    stretch = np.asarray(load_image_folder(folder, SPEC, "resize=stretch").inputs["x"])
    assert np.abs(stretch[0, :, :4] - 114 / 255).max() > 0.2  # stretch fills the canvas


def test_flip_and_scale_augment_multiply_samples_seeded(tmp_path):
    folder = _folder(tmp_path, 3)
    data = load_image_folder(folder, SPEC, "augment=flip+scale,seed=3")
    x = data.inputs["x"]
    assert len(x) == 12 and data.images == 3 and "3 images x4" in data.source
    specs = x.specs[:4]
    assert [(s.flip, s.scale != 1.0) for s in specs] == [
        (False, False), (False, True), (True, False), (True, True)]
    np.testing.assert_array_equal(x[2], x[0][:, :, ::-1])  # the flip is a mirror image
    assert 0.75 <= specs[1].scale <= 1.25
    again = load_image_folder(folder, SPEC, "augment=flip+scale,seed=3").inputs["x"]
    np.testing.assert_array_equal(np.asarray(again), np.asarray(x))
    other = load_image_folder(folder, SPEC, "augment=scale,seed=4").inputs["x"]
    assert other.specs[1].scale != specs[1].scale


def test_split_holds_out_whole_original_images_only(tmp_path):
    folder = _folder(tmp_path, 8)
    data = load_image_folder(folder, SPEC, "augment=flip+scale")
    fit, held = data.split(0.25, seed=0)
    fit_images = {s.image for s in fit.inputs["x"].specs}
    held_specs = held.inputs["x"].specs
    assert held.n == 2 and fit.n == 6 * 4
    assert not any(s.augmented for s in held_specs)
    assert fit_images.isdisjoint({s.image for s in held_specs})


def test_samples_stream_batch_by_batch_with_a_bounded_cache(tmp_path):
    folder = _folder(tmp_path, 6)
    data = load_image_folder(folder, SPEC, "augment=flip,cache=0")
    x = data.inputs["x"]
    assert isinstance(x, ImageSamples) and x.shape == (12, 3, 16, 16)
    sub = data.subset(np.array([1, 5, 7]))
    assert isinstance(sub.inputs["x"], ImageSamples) and x.cache.decodes == 0  # lazy
    assert x[3:5].shape == (2, 3, 16, 16) and x.cache.decodes == 2  # only that batch
    assert not x.cache.items  # a zero budget keeps nothing
    cached = load_image_folder(folder, SPEC, "cache=64").inputs["x"]
    cached[0:6]
    cached[0:6]
    assert cached.cache.decodes == 6
    # a model runs on it in batches, as every capture does
    import onnx_ir as ir

    model = ir.from_proto(conv_model(["N", 3, 16, 16], 4, [3, 3], pads=[1, 1, 1, 1]))
    out = list(runtime.run_batched(runtime.make_session(model), {"x": x}, batch_size=5))
    assert [len(next(iter(o.values()))) for o in out] == [5, 5, 2]


def test_bad_preprocess_and_broken_files_are_named_up_front(tmp_path):
    with pytest.raises(CalibrationError, match="augment"):
        parse_preprocess("augment=rotate")
    with pytest.raises(CalibrationError, match="jitter"):
        parse_preprocess("jitter=1.5")
    folder = _folder(tmp_path, 2)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CalibrationError, match="broken.png"):
        load_image_folder(folder, SPEC, None)


def test_load_calibration_reads_an_augmented_folder(tmp_path):
    import onnx_ir as ir

    folder = _folder(tmp_path, 4)
    model = ir.from_proto(conv_model(["N", 3, 16, 16], 4, [3, 3]))
    data = load_calibration(folder, model, preprocess="resize=letterbox,augment=flip")
    assert data.n == 8 and data.source.endswith("(4 images x2 augment=flip, resize=letterbox)")
