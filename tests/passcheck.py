"""Run one pass on a model and prove the result: full ONNX check, onnxruntime, outputs compared."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from rewriter.passes import get_pass

from rewriter.io import load
from rewriter.report import PassReport
from tests.conftest import ort_run


def run_pass(source, name: str, **options) -> tuple[ir.Model, PassReport]:
    """Load `source` (path or ModelProto), run pass `name` with `options`; model and report."""
    model = load(source)
    instance = get_pass(name)(options)
    instance(model)
    return model, instance.report


def checked_proto(model: ir.Model) -> onnx.ModelProto:
    """The IR model as a proto that passes the full ONNX check."""
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def random_feeds(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input (`shapes` fixes symbolic dims)."""
    from tests.modelcheck import seeded_feeds

    return seeded_feeds(proto, seed=seed, overrides=shapes)


def max_rel_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    scale = max(float(np.abs(reference).max()), 1e-30)
    return float(np.abs(reference.astype(np.float64) - candidate).max()) / scale


def assert_same_outputs(original, rewritten: ir.Model, feeds: dict[str, np.ndarray],
                        rtol: float) -> float:
    """Run both in onnxruntime; every output within `rtol` (max-relative). Returns the worst."""
    before_bytes = (original if isinstance(original, onnx.ModelProto) else onnx.load(str(original)))
    before = ort_run(before_bytes.SerializeToString(), feeds)
    after = ort_run(checked_proto(rewritten).SerializeToString(), feeds)
    assert len(before) == len(after)
    worst = 0.0
    for ref, got in zip(before, after, strict=True):
        assert ref.shape == got.shape
        worst = max(worst, max_rel_error(ref, got))
    assert worst <= rtol, f"outputs moved by {worst:.3g} > {rtol}"
    return worst


def text_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A rendered line-of-text image, normalised like PP-OCR det input ([1, 3, H, W] float32):
    random noise drives the detector's sigmoid output to ~1e-5 everywhere, where relative
    errors mean nothing; text gives a real probability map."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (235, 235, 230))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, height // 10))
    for row in range(4):
        text = "".join(rng.choice(list("ABCDEFGH0123456789 onexone"), 12))
        draw.text((10, 10 + row * height // 4), text, fill=(20, 20, 20), font=font)
    x = np.asarray(image, np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return x.transpose(2, 0, 1)[None].astype(np.float32)
