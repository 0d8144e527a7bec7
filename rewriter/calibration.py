"""Calibration data: `.npz` (input name -> array, optional `labels`), `.npy`, image folders, or
`random`. Samples split deterministically into a fitting part and a held-out part for fidelity.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from rewriter.errors import CalibrationError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class CalibrationSet:
    """Model inputs by name (first axis = samples), optional labels, and where they came from."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    synthetic: bool = False

    @property
    def n(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def subset(self, index: np.ndarray) -> CalibrationSet:
        return CalibrationSet(
            {k: v[index] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[index],
            self.source,
            self.synthetic,
        )

    def split(self, holdout: float = 0.25, seed: int = 0) -> tuple[CalibrationSet, CalibrationSet]:
        """A seeded shuffle, then (fit, held-out); both keep at least one sample when n >= 2."""
        n = self.n
        if n < 2:
            return self, self
        order = np.random.default_rng(seed).permutation(n)
        n_hold = min(max(1, int(round(n * holdout))), n - 1)
        return self.subset(np.sort(order[n_hold:])), self.subset(np.sort(order[:n_hold]))

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.n, batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.inputs.items()}


@dataclass
class InputSpec:
    """A model input: name, numpy dtype and shape (None for a symbolic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


def model_input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a caller feeds (initializers that are also inputs excluded)."""
    inits = set(model.graph.initializers)
    specs = []
    for value in model.graph.inputs:
        if value.name in inits:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = tuple(d if isinstance(d, int) else None for d in (value.shape or []))
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def load_calibration(
    spec: str | os.PathLike | Mapping[str, np.ndarray] | CalibrationSet | Iterable,
    model: ir.Model,
    *,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    preprocess: str | Mapping | None = None,
    n_random: int = 64,
    seed: int = 0,
) -> CalibrationSet:
    """Read calibration data for `model` and check it matches the model's inputs."""
    specs = model_input_specs(model)
    if isinstance(spec, CalibrationSet):
        data = spec
    elif is_stream(spec):
        data = from_stream(spec, specs)
    elif isinstance(spec, Mapping):
        data = _from_mapping(dict(spec), specs, "<dict>")
    elif str(spec) == "random":
        data = _random(specs, input_shapes or {}, n_random, seed, model)
    else:
        path = Path(spec)
        if not path.exists():
            raise CalibrationError(f"calib {spec}: no such file or folder")
        if path.is_dir():
            from rewriter.images import load_image_folder

            data = load_image_folder(path, specs, preprocess)
        elif path.suffix == ".npz":
            _check_npz_size(path, str(spec))
            try:
                with np.load(path, allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
            except Exception as exc:
                raise CalibrationError(f"calib {spec}: cannot read npz ({exc})") from None
            data = _from_mapping(arrays, specs, str(spec))
        elif path.suffix == ".npy":
            if len(specs) != 1:
                raise CalibrationError(
                    f"calib {spec}: a .npy serves single-input models; this one has inputs "
                    f"{[s.name for s in specs]} (use a .npz keyed by input name)"
                )
            try:
                array = np.load(path, allow_pickle=False)
            except Exception as exc:
                raise CalibrationError(f"calib {spec}: cannot read npy ({exc})") from None
            data = _from_mapping({specs[0].name: array}, specs, str(spec))
        else:
            raise CalibrationError(
                f"calib {spec}: expected .npz, .npy, a folder of images, or 'random'"
            )
    _check_against_model(data, specs)
    _check_values(data)
    return data


def _check_npz_size(path: Path, label: str) -> None:
    """Decompressed size from the zip headers, checked before anything is inflated (a 1 MB
    file can hold a 1 GiB array of zeros)."""
    import zipfile

    from rewriter.limits import check_memory

    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CalibrationError(f"calib {label}: cannot read npz ({exc})") from None
    # Loading, the dtype cast and the fit/held-out split each hold a copy.
    check_memory(3 * total, f"calib {label}: {total} bytes of arrays once decompressed "
                 "(3 copies while loading and splitting)")


def _check_values(data: CalibrationSet) -> None:
    """Refuse NaN, inf and float32-overflowing values before any fit sees them."""
    from rewriter.finite import MAX_ABS, bad_samples

    for name, array in data.inputs.items():
        bad = bad_samples(array)
        if len(bad):
            raise CalibrationError(
                f"calib {data.source}: input '{name}' has {len(bad)} of {len(array)} samples "
                f"with NaN, inf or |value| > {MAX_ABS:g} (first: sample {int(bad[0])}); "
                "fix or remove them"
            )


def _numeric(array: np.ndarray, what: str, source: str) -> np.ndarray:
    """The array when it holds numbers (bool, int, float); strings and objects are refused."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise CalibrationError(
            f"calib {source}: {what} holds {array.dtype} values, not numbers"
        )
    return array
def is_stream(spec: object) -> bool:
    """An onnxruntime `CalibrationDataReader` (has `get_next`) or an iterable of input dicts."""
    if hasattr(spec, "get_next"):
        return True
    return isinstance(spec, Iterable) and not isinstance(
        spec, (str, bytes, os.PathLike, Mapping, CalibrationSet, np.ndarray)
    )


def from_stream(stream: object, specs: list[InputSpec], source: str = "<stream>") -> CalibrationSet:
    """Read an iterator/generator of `{input name: array}` dicts (a batch each, or one sample
    without the batch axis) or a `CalibrationDataReader` once, batch by batch, into one set."""
    if hasattr(stream, "get_next"):
        reader = stream
        items: Iterable = iter(lambda: reader.get_next(), None)  # type: ignore[attr-defined]
        source = type(stream).__name__
    else:
        items = stream  # type: ignore[assignment]
    names = [s.name for s in specs]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    labels: list[np.ndarray] = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise CalibrationError(
                f"calib {source}: item {index} is a {type(item).__name__}, expected a dict of "
                f"input name -> array (inputs {names})"
            )
        missing = [n for n in names if n not in item]
        if missing:
            raise CalibrationError(
                f"calib {source}: item {index} has no array for input(s) {missing}; "
                f"found {sorted(item)}"
            )
        for s in specs:
            array = np.asarray(item[s.name])
            if len(s.shape) and array.ndim == len(s.shape) - 1:
                array = array[None]  # one sample without the batch axis
            parts[s.name].append(array.astype(s.dtype, copy=False))
        if "labels" in item:
            labels.append(np.atleast_1d(np.asarray(item["labels"])))
    if not parts[names[0]] if names else True:
        raise CalibrationError(f"calib {source}: the iterator yielded no samples")
    try:
        inputs = {n: np.ascontiguousarray(np.concatenate(parts[n])) for n in names}
    except ValueError as exc:
        raise CalibrationError(f"calib {source}: batches do not stack ({exc})") from None
    label_array = np.concatenate(labels) if labels else None
    return CalibrationSet(inputs, label_array, source, synthetic=False)


def _from_mapping(
    arrays: dict[str, np.ndarray], specs: list[InputSpec], source: str
) -> CalibrationSet:
    labels = arrays.pop("labels", None)
    if labels is not None:
        labels = _numeric(labels, "'labels'", source)
        if labels.ndim != 1:
            raise CalibrationError(
                f"calib {source}: 'labels' must hold one class index per sample (shape [N]), "
                f"not shape {list(labels.shape)}"
            )
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise CalibrationError(
            f"calib {source}: no array for model input(s) {missing}; found {sorted(arrays)}"
        )
    inputs = {}
    for s in specs:
        array = _numeric(arrays[s.name], f"input '{s.name}'", source)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow shows up as inf, refused
            inputs[s.name] = np.ascontiguousarray(array).astype(s.dtype, copy=False)
    return CalibrationSet(inputs, labels, source, synthetic=False)


def _random(
    specs: list[InputSpec],
    input_shapes: Mapping[str, tuple[int, ...]],
    n: int,
    seed: int,
    model: ir.Model | None = None,
) -> CalibrationSet:
    from rewriter.limits import check_memory

    rng = np.random.default_rng(seed)
    inputs = {}
    for s in specs:
        shape = input_shapes.get(s.name) or s.shape
        dims = list(shape)
        if dims and dims[0] is None:
            dims[0] = 1
        if any(d is None for d in dims):
            raise CalibrationError(
                f"calib random: input '{s.name}' has dynamic dims {list(s.shape)}; "
                f"give --input-shape {s.name}:..."
            )
        if not dims:
            raise CalibrationError(
                f"calib random: input '{s.name}' is a scalar (no sample axis); give data "
                "in a .npz instead"
            )
        sample = [n, *dims[1:]]
        check_memory(int(np.prod(sample, dtype=object)) * s.dtype.itemsize,
                     f"calib random: {n} samples of input '{s.name}' {sample}")
        if np.issubdtype(s.dtype, np.floating):
            inputs[s.name] = rng.standard_normal(sample).astype(s.dtype)
        else:
            from rewriter.synthetic import integer_range

            low, high = integer_range(model, s.name, s.dtype)
            inputs[s.name] = rng.integers(low, high, sample).astype(s.dtype)
    return CalibrationSet(inputs, None, "random", synthetic=True)


def _check_against_model(data: CalibrationSet, specs: list[InputSpec]) -> None:
    counts = {k: len(v) for k, v in data.inputs.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationError(
            f"calib {data.source}: inputs have different sample counts {counts}"
        )
    if data.n == 0:
        raise CalibrationError(f"calib {data.source}: no samples")
    for s in specs:
        got = data.inputs[s.name].shape
        want = s.shape
        if len(got) != len(want) or any(
            w is not None and w != g for w, g in zip(want[1:], got[1:], strict=False)
        ):
            raise CalibrationError(
                f"calib {data.source}: input '{s.name}' has shape {list(got)}, model expects "
                f"{['?' if d is None else d for d in want]}"
            )
    if data.labels is not None and len(data.labels) != data.n:
        raise CalibrationError(
            f"calib {data.source}: {len(data.labels)} labels for {data.n} samples"
        )


def data_input_shapes(model: ir.Model, data: CalibrationSet) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes (batch 1) for inputs whose non-batch dims are dynamic, read off the data.

    Lets analysis and benchmarks of e.g. a detector with dynamic H and W use the sizes of the
    calibration images without the user repeating them in --input-shape.
    """
    shapes = {}
    for s in model_input_specs(model):
        if any(d is None for d in s.shape[1:]) and s.name in data.inputs:
            shapes[s.name] = (1, *data.inputs[s.name].shape[1:])
    return shapes
