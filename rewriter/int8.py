"""onnxruntime static int8 as a building block: pre-processing, calibration, QDQ quantization.

We never write a quantizer: this module only drives `onnxruntime.quantization` on files in a
temp folder. Calibration ranges are computed once and cached (`calibration_cache_path`, onnxruntime
>= 1.27; older ones calibrate again on each call), so
re-quantizing with another `nodes_to_exclude` list (what auto-exclusion does) costs the QDQ
rewrite only, not another pass over the calibration set.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter

from rewriter.errors import PassError

#: Samples fed to the calibrator per `collect_data` call: histograms and min/max merge across
#: chunks, so memory stays bounded by one chunk's intermediate tensors.
CALIBRATION_CHUNK = 8

ACTIVATION_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


class SampleReader:
    """A `CalibrationDataReader` over in-memory samples, fed in the model's batch size.

    Implements `__len__` and `set_range` so onnxruntime can calibrate in strided chunks
    (`CalibStridedMinMax`), one chunk's intermediate outputs in memory at a time.
    """

    def __init__(self, inputs: Mapping[str, np.ndarray], batch: int = 1) -> None:
        self.inputs = {k: np.ascontiguousarray(v) for k, v in inputs.items()}
        self.batch = max(1, batch)
        self.n = len(next(iter(self.inputs.values()))) if self.inputs else 0
        self.set_range(0, self.n)

    def __len__(self) -> int:
        return self.n

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, self.n)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        start, self._next = self._next, min(self._next + self.batch, self._end)
        return {k: v[start : self._next] for k, v in self.inputs.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


@dataclass
class StaticQuantizer:
    """Quantizes one float model file again and again with different exclusions.

    `calls` counts `quantize_static` invocations (auto-exclusion keeps it bounded).
    """

    source: Path
    folder: Path
    inputs: Mapping[str, np.ndarray]
    activation: str = "uint8"
    weight: str = "int8"
    method: str = "minmax"
    per_channel: bool = True
    batch: int = 1
    calls: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def cache(self) -> Path:
        return self.folder / "calibration-ranges.json"

    def quantize(self, exclude: Sequence[str] = (), tag: str = "q") -> Path:
        """The QDQ model with `exclude` (node names) left in float; returns its path."""
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        out = self.folder / f"{tag}-{self.calls}.onnx"
        reader = None
        extra: dict = {"ActivationSymmetric": self.activation == "int8", "WeightSymmetric": True}
        # calibration_cache_path is onnxruntime >= 1.27; older ones calibrate on every call
        cached = "calibration_cache_path" in inspect.signature(quantize_static).parameters
        if cached:
            extra_kwargs: dict = {"calibration_cache_path": str(self.cache)}
        else:
            extra_kwargs = {}
        if not cached or not self.cache.exists():
            n = len(next(iter(self.inputs.values())))
            chunk = min(CALIBRATION_CHUNK, n) - min(CALIBRATION_CHUNK, n) % self.batch
            chunk = max(chunk, self.batch)
            usable = n - n % chunk
            inputs = {k: v[:usable] for k, v in self.inputs.items()}
            reader = SampleReader(inputs, self.batch)
            extra["CalibStridedMinMax"] = chunk
        try:
            with _quiet():
                quantize_static(
                    str(self.source), str(out), reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=self.per_channel,
                    activation_type=getattr(QuantType, ACTIVATION_TYPES[self.activation]),
                    weight_type=getattr(QuantType, ACTIVATION_TYPES[self.weight]),
                    calibrate_method=getattr(CalibrationMethod, METHODS[self.method]),
                    nodes_to_exclude=list(exclude),
                    extra_options=extra,
                    **extra_kwargs,
                )
        except Exception as exc:  # onnxruntime raises ValueError, RuntimeError, onnx errors
            message = " ".join(str(exc).split())[:300]
            raise PassError(
                f"pass 'quantize': onnxruntime quantize_static failed: {message}"
            ) from None
        self.calls += 1
        return out


def preprocess(source: Path, target: Path) -> tuple[Path, str | None]:
    """`quant_pre_process` (shape inference, BN folding); on failure the model goes in as it
    is and the reason is returned (its quantization may then cover fewer tensors)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
        onnx.checker.check_model(str(target))
    except Exception as exc:  # symbolic shape inference fails on some exports
        return source, f"quant_pre_process skipped: {' '.join(str(exc).split())[:200]}"
    return target, None


#: Per-channel QDQ needs DequantizeLinear's `axis`, which arrived in opset 13.
PER_CHANNEL_OPSET = 13


def default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(source: Path, target: Path, minimum: int = PER_CHANNEL_OPSET) -> tuple[Path, str]:
    """The model at `source` converted to opset `minimum` (onnx's version converter), or the
    source unchanged with the reason it could not be converted."""
    proto = onnx.load(str(source))
    opset = default_opset(proto)
    if opset >= minimum:
        return source, ""
    try:
        converted = onnx.version_converter.convert_version(proto, minimum)
        onnx.checker.check_model(converted)
        onnx.save(converted, str(target))
    except Exception as exc:  # the converter lacks adapters for some ops
        message = " ".join(str(exc).split())[:200]
        return source, f"cannot convert opset {opset} to {minimum}: {message}"
    return target, f"model converted from opset {opset} to {minimum} for per-channel int8 weights"


def prune_opset_imports(proto: onnx.ModelProto) -> None:
    """Drop opset imports of domains no node uses (pre-processing adds every ORT domain)."""
    used = {n.domain or "" for n in proto.graph.node}
    for function in proto.functions:
        used.add(function.domain)
        used.update(n.domain or "" for n in function.node)
    keep = [o for o in proto.opset_import if (o.domain or "") in used or not o.domain]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime.quantization logs advice at WARNING through the root logger and prints."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
