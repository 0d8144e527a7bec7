"""Rendered OCR pages and the PP-OCRv4 pipeline: the data is real text the shipped models read,
and a bottlenecked det model keeps the pipeline's readings (slow test)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("rapidocr_onnxruntime")

from bench.bench_ocr import (  # noqa: E402
    OcrLine,
    compare_readings,
    edit_distance,
    ground_truth_accuracy,
    ocr_engine,
    read_pages,
)
from models.ocr_data import (  # noqa: E402
    CALIB_SEED_BASE,
    PAGE_SIZE,
    bundled_fonts,
    det_calibration,
    eval_pages,
    render_page,
)
from tests.conftest import rapidocr_model  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return ocr_engine(rapidocr_model("det"))


def test_pages_are_deterministic_and_seed_dependent():
    a, b, c = render_page(7), render_page(7), render_page(8)
    assert np.array_equal(a.image, b.image)
    assert [x.text for x in a.lines] == [x.text for x in b.lines]
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (PAGE_SIZE, PAGE_SIZE, 3) and a.image.dtype == np.uint8
    assert 4 <= len(a.lines) <= 12
    for line in a.lines:
        x0, y0, x1, y1 = line.box
        assert 0 <= x0 < x1 <= PAGE_SIZE and 0 <= y0 < y1 <= PAGE_SIZE
        # ink where the line is, (noisy) background far from any text
        assert a.image[y0:y1, x0:x1].min() < 100
    assert a.image[-6:, :].min() > 150


def test_fonts_include_pillow_bundled_and_matplotlib():
    names = [f.name for f in bundled_fonts()]
    assert names[0] == "pillow-default"
    assert "DejaVuSans" in names
    used = {line.font for page in eval_pages(6) for line in page.lines}
    assert len(used) >= 4


def test_calibration_is_rapidocr_det_preprocessing(engine):
    image = render_page(CALIB_SEED_BASE).image
    expected = engine.text_det.get_preprocess(max(image.shape[:2]))(image)
    calib = det_calibration(2)["x"]
    assert calib.shape == (2, 3, PAGE_SIZE, PAGE_SIZE) and calib.dtype == np.float32
    np.testing.assert_array_equal(calib[:1], expected)


def test_original_pipeline_reads_the_rendered_text(engine):
    pages = eval_pages(2)
    readings = read_pages(engine, pages)
    scores = ground_truth_accuracy(pages, readings)
    assert scores["lines"] == sum(len(p.lines) for p in pages)
    assert scores["char_accuracy"] >= 0.95, scores
    assert scores["line_exact"] >= 0.7, scores


def test_compare_readings_counts_changed_missing_and_extra():
    ref = [[OcrLine((0, 0, 100, 20), "hello 12", 0.9), OcrLine((0, 40, 100, 60), "world", 0.9)]]
    same = compare_readings(ref, ref)
    assert same["unchanged_share"] == 1.0 and same["missing"] == 0
    got = [[OcrLine((1, 1, 101, 21), "hello 13", 0.9), OcrLine((0, 100, 50, 120), "x", 0.9)]]
    diff = compare_readings(ref, got)
    assert diff["unchanged"] == 0 and diff["missing"] == 1 and diff["extra"] == 1
    assert diff["changed_examples"] == [{"original": "hello 12", "rewritten": "hello 13"}]


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("same", "same") == 0


@pytest.mark.slow
def test_bottlenecked_det_keeps_the_pipeline_readings(tmp_path, engine):
    """refit at target 0.3 (32.5% fewer det MACs): on 40 bench pages 98.9% of lines keep their
    characters (95.7% byte-identical: the rest differ in spaces only, see bench_ocr)."""
    from bench.bench_ocr import DET_SHAPE, det_macs
    from models.ocr_data import save_det_calibration
    from rewriter import load
    from rewriter.io import save
    from rewriter.pipeline import rewrite

    calib = save_det_calibration(tmp_path / "calib.npz", 12)
    result = rewrite(load(rapidocr_model("det")), ["bottleneck:target=0.3,init=refit,mode=in"],
                     calib=str(calib))
    path = save(result.model, tmp_path / "det.onnx")
    onnx.checker.check_model(onnx.load(path), full_check=True)
    removed = 1 - det_macs(path) / det_macs(rapidocr_model("det"))
    assert removed >= 0.3, removed
    assert DET_SHAPE[2] == PAGE_SIZE

    pages = eval_pages(8)
    reference = read_pages(engine, pages)
    readings = read_pages(ocr_engine(path), pages)
    compared = compare_readings(reference, readings)
    assert compared["lines"] >= 50
    assert compared["same_chars_share"] >= 0.95, compared
    assert compared["unchanged_share"] >= 0.85, compared
    assert compared["missing"] <= 1, compared
    assert ground_truth_accuracy(pages, readings)["char_accuracy"] >= 0.95
