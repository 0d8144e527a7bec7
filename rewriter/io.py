"""Safe ONNX load and save on top of onnx-ir.

`load` refuses anything it cannot trust before reading tensor data: files that are not ONNX,
truncated or invalid graphs, external data that points outside the model's folder, tensors whose
declared size does not match the bytes they hold. `save` validates the model on a temporary file
(onnx.checker full check, then an onnxruntime session) and only then renames it into place, so a
failed save leaves nothing behind and the input model is never overwritten.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from rewriter.errors import ModelLoadError, ModelSaveError
from rewriter.shapes import infer_shapes

logger = logging.getLogger(__name__)

#: Protobuf cannot hold more than 2 GiB; above this, tensors go to an external data file.
PROTOBUF_LIMIT = 2**31 - 1
#: Above this size the onnxruntime session check on save is skipped (it would map the weights).
SESSION_CHECK_LIMIT = 4 * 2**30
#: Keys in `ir.Model.meta` (in-memory only, never serialized).
META_SOURCE = "onexone.source_path"
META_DATA_FILES = "onexone.source_data_files"
META_WARNINGS = "onexone.warnings"

_STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}


def load(source: str | os.PathLike | bytes | onnx.ModelProto) -> ir.Model:
    """Read a model into the IR after checking it is safe and valid; shapes are inferred."""
    if isinstance(source, onnx.ModelProto):
        label, proto, base_dir, path = "<ModelProto>", source, None, None
    elif isinstance(source, (bytes, bytearray)):
        label, base_dir, path = "<bytes>", None, None
        proto = _parse(bytes(source), label)
    else:
        path = Path(source).expanduser().absolute()
        label = str(source)
        _check_readable_file(path, label)
        base_dir = path.parent
        proto = _parse(path.read_bytes(), label)
    _check_is_model(proto, label)
    data_files = _check_external_data(proto, base_dir, label)
    _check_tensor_sizes(proto, label)
    try:
        # The checker resolves external-data locations against the model's folder only when it
        # is given the path (from a proto it would look in the working directory).
        onnx.checker.check_model(str(path) if data_files else proto)
    except Exception as exc:  # onnx raises ValidationError and, for some graphs, others
        raise ModelLoadError(f"{label}: invalid ONNX graph: {_first_line(exc)}") from None
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelLoadError(f"{label}: cannot read graph: {_first_line(exc)}") from None
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
        _set_function_base_dir(model, base_dir)
    model.meta[META_SOURCE] = str(path) if path else None
    model.meta[META_DATA_FILES] = sorted(data_files)
    model.meta[META_WARNINGS] = []
    _infer_or_explain(model, label)
    problem = conv_weight_problem(model)
    if problem:
        raise ModelLoadError(f"{label}: {problem}")
    return model


def _set_function_base_dir(model: ir.Model, base_dir: Path) -> None:
    """onnx-ir sets the folder for the main graph only: a Constant's external data inside a
    local function would otherwise be read relative to the working directory."""
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and isinstance(
                    attr.value, ir.ExternalTensor
                ):
                    attr.value.base_dir = base_dir


def _check_readable_file(path: Path, label: str) -> None:
    if not path.exists():
        raise ModelLoadError(f"{label}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{label}: is a directory, not an ONNX file")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{label}: empty file, not an ONNX model")
    if size > PROTOBUF_LIMIT:  # refused before reading: protobuf cannot parse it anyway
        raise ModelLoadError(
            f"{label}: {size / 2**30:.1f} GiB file is over protobuf's 2 GiB limit, so not a "
            "valid ONNX file (models this large keep their weights in external data)"
        )


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{label}: not an ONNX model or truncated (protobuf parse failed: {_first_line(exc)})"
        ) from None
    return proto


def _check_is_model(proto: onnx.ModelProto, label: str) -> None:
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise ModelLoadError(
            f"{label}: not an ONNX model or truncated (no graph, ir_version or opset_import)"
        )


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_graphs(sub)


def _all_tensor_protos(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every tensor in the model with a label saying where it sits (initializer or node),
    local functions included."""
    for graph in _all_graphs(proto.graph):
        for init in graph.initializer:
            yield f"initializer '{init.name}'", init
    nodes = [node for graph in _all_graphs(proto.graph) for node in graph.node]
    for function in proto.functions:
        nodes.extend(function.node)
        for node in function.node:  # graphs inside function nodes (If/Loop bodies)
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs
                for sub in subs:
                    nodes.extend(n for g in _all_graphs(sub) for n in g.node)
    for node in nodes:
        for attr in node.attribute:
            where = f"node '{node.name}' ({node.op_type}) attribute '{attr.name}'"
            if attr.type == onnx.AttributeProto.TENSOR:
                yield where, attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                for t in attr.tensors:
                    yield where, t


def _check_external_data(proto: onnx.ModelProto, base_dir: Path | None, label: str) -> set[str]:
    """Refuse external data that is absolute or escapes the model's folder, before any read."""
    files: set[str] = set()
    for where, tensor in _all_tensor_protos(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if base_dir is None:
            raise ModelLoadError(
                f"{label}: {where} uses external data; load the model from its file path"
            )
        if "\x00" in location:
            raise ModelLoadError(f"{label}: {where} external data location {location!r} "
                                 "contains a NUL byte")
        if not location or os.path.isabs(location) or Path(location).drive:
            raise ModelLoadError(
                f"{label}: {where} has an absolute or empty external data location {location!r}"
            )
        root = base_dir.resolve()
        target = (base_dir / location).resolve()
        if root != target and root not in target.parents:
            raise ModelLoadError(
                f"{label}: {where} external data {location!r} resolves outside the model's folder"
            )
        if (base_dir / location).is_symlink():
            raise ModelLoadError(
                f"{label}: {where} external data {location!r} is a symbolic link (onnx refuses "
                "links; copy the file next to the model)"
            )
        if not target.is_file():
            raise ModelLoadError(f"{label}: {where} external data file {location!r} is missing")
        offset, length = _external_int(info, "offset", where, label), info.get("length")
        if length is not None:
            length = _external_int(info, "length", where, label)
        expected = _declared_nbytes(tensor)
        size = target.stat().st_size
        if length is not None and expected is not None and int(length) != expected:
            raise ModelLoadError(
                f"{label}: {where} declares {expected} bytes but its external data length is "
                f"{length}"
            )
        need = int(length) if length is not None else (expected or 0)
        if offset < 0 or offset + need > size:
            raise ModelLoadError(
                f"{label}: {where} external data {location!r} is shorter than declared "
                f"(needs bytes {offset}..{offset + need}, file has {size})"
            )
        files.add(str(target))
    return files


def _external_int(info: dict[str, str], key: str, where: str, label: str) -> int:
    """An external-data `offset`/`length` entry as a non-negative integer, else a clear error."""
    text = info.get(key, "") or "0"
    if not (text.isascii() and text.isdigit()):
        raise ModelLoadError(f"{label}: {where} external data {key} {text!r} is not a "
                             "non-negative integer")
    return int(text)


def _declared_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's dims and dtype call for; None for types without a fixed width."""
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except Exception:
        return None
    if dtype == np.dtype(object):
        return None
    count = int(np.prod([int(d) for d in tensor.dims], dtype=object)) if tensor.dims else 1
    bits = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    if tensor.data_type in bits:
        return (count + 1) // 2
    return count * dtype.itemsize


def _check_tensor_sizes(proto: onnx.ModelProto, label: str) -> None:
    """A tensor whose dims promise more data than it holds fails here, before any allocation."""
    for where, tensor in _all_tensor_protos(proto):
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(f"{label}: {where} has a negative dimension {list(tensor.dims)}")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        expected = _declared_nbytes(tensor)
        if expected is None:
            continue
        if tensor.HasField("raw_data") or tensor.raw_data:
            held = len(tensor.raw_data)
        else:
            held = _typed_field_nbytes(tensor, expected)
            if held is None:
                continue
        if held != expected:
            raise ModelLoadError(
                f"{label}: {where} declares shape {list(tensor.dims)} "
                f"({expected} bytes) but holds {held} bytes"
            )


def _typed_field_nbytes(tensor: onnx.TensorProto, expected: int) -> int | None:
    """Bytes held by the typed repeated fields, scaled to the declared element width."""
    fields = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
    counts = [len(getattr(tensor, f)) for f in fields]
    n = max(counts)
    if n == 0:
        return 0 if expected else None
    count = int(np.prod(list(tensor.dims), dtype=object)) if tensor.dims else 1
    if n == count:
        return expected
    # int32_data packs fp16/bf16/int8/... one element per entry; complex types use two.
    if n == 2 * count and tensor.data_type in (
        onnx.TensorProto.COMPLEX64,
        onnx.TensorProto.COMPLEX128,
    ):
        return expected
    four_bit = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    if tensor.data_type in four_bit and n == (count + 1) // 2:
        return expected
    return expected * n // max(count, 1) if count else n


def _infer_or_explain(model: ir.Model, label: str) -> None:
    """Shape inference that raises for invalid standard graphs and warns for custom ops."""
    error = infer_shapes(model, strict=True)
    if error is None:
        return
    if _custom_domains(model):
        logger.warning("%s: shape inference incomplete (%s)", label, error)
        model.meta[META_WARNINGS].append(f"shape inference incomplete: {error}")
        infer_shapes(model, strict=False)
        return
    raise ModelLoadError(f"{label}: invalid ONNX graph (shape inference failed: {error})")


def conv_weight_problem(model: ir.Model) -> str | None:
    """Why a Conv's weight or bias does not fit its input, or None. onnx's shape inference and
    onnxruntime's session creation both accept a channel mismatch and only fail when run."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        w_shape = _known_dims(w)
        if w_shape is None or x is None:
            continue
        where = f"node '{node.name}' (Conv) weight '{w.name}' shape {list(w_shape)}"
        group = node.attributes.get_int("group", 1)
        x_shape = _known_dims(x, partial=True)
        if x_shape is not None and len(x_shape) != len(w_shape):
            return f"{where} does not match input '{x.name}' of rank {len(x_shape)}"
        if group < 1 or (w_shape and w_shape[0] % group):
            return f"{where} cannot be split into group={group}"
        channels = x_shape[1] if x_shape is not None and len(x_shape) > 1 else None
        if isinstance(channels, int) and channels != w_shape[1] * group:
            return (f"{where} needs {w_shape[1] * group} input channels but input '{x.name}' "
                    f"has {channels}")
        kernel = node.attributes.get_ints("kernel_shape", None)
        if kernel is not None and tuple(kernel) != tuple(w_shape[2:]):
            return f"{where} does not match kernel_shape {list(kernel)}"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        b_shape = _known_dims(bias) if bias is not None else None
        if b_shape is not None and b_shape != (w_shape[0],):
            return (f"{where} has {w_shape[0]} filters but bias '{bias.name}' has shape "
                    f"{list(b_shape)}")
    return None


def _known_dims(value: ir.Value | None, *, partial: bool = False) -> tuple | None:
    """Static dims of a value (its constant's when it has one); with `partial`, symbolic dims
    come back as None entries instead of making the whole shape unknown."""
    if value is None:
        return None
    shape = value.const_value.shape if value.const_value is not None else value.shape
    if shape is None:
        return None
    dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
    if not partial and None in dims:
        return None
    return dims


def _custom_domains(model: ir.Model) -> set[str]:
    return {
        node.domain
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.domain not in _STANDARD_DOMAINS
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:2])[:400]


# --------------------------------------------------------------------------------------- save


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Validate the model on a temp file in the target folder, then rename it into place.

    External data is used when the model came with it or is over the protobuf limit. Returns
    the absolute output path.
    """
    staged = stage(model, path, external_data=external_data)
    try:
        return staged.commit()
    finally:
        staged.discard()


class StagedModel:
    """A validated model (and data file) in a private temp folder beside its output, not yet
    visible: `commit()` renames it into place, `discard()` removes it. Lets a caller write the
    report and plot first, so a failure there leaves no model behind.

    The data file is named by its content hash (`out.onnx.<hash8>.data`) and the model refers
    to that name, so the pair replaces atomically as one unit: the data file is renamed in
    first under a name no old model uses, then the model (the one atomic switch), then the
    data files no model of this output refers to any more are removed. A kill at any point
    leaves the old pair or the new pair, plus at most an orphan data file the next write of
    this output removes. Writers of one output are serialised by a lock.
    """

    def __init__(self, model: ir.Model, out: Path, tmp_dir: Path, data_name: str | None) -> None:
        self.out, self.tmp_dir, self.data_name = out, tmp_dir, data_name
        self._model = model

    @property
    def nbytes(self) -> int:
        """Bytes the output will take (model plus data file)."""
        return sum(p.stat().st_size for p in self.tmp_dir.iterdir() if p.is_file())

    def commit(self) -> Path:
        from rewriter.atomic import fault_point, output_lock

        model_mode, data_mode = _output_modes(self._model)
        tmp_model = self.tmp_dir / self.out.name
        try:
            with output_lock(self.out):
                if self.data_name:
                    os.chmod(self.tmp_dir / self.data_name, data_mode)
                    os.replace(self.tmp_dir / self.data_name, self.out.parent / self.data_name)
                    fault_point("data-renamed")
                os.chmod(tmp_model, model_mode)
                os.replace(tmp_model, self.out)
                fault_point("model-renamed")
                self._remove_unused_data_files()
                fault_point("committed")
        except OSError as exc:
            raise ModelSaveError(f"{self.out}: cannot write ({exc.strerror or exc})") from None
        return self.out

    def _remove_unused_data_files(self) -> None:
        """Earlier data files of this output (hash-named, so ours), but never an input's."""
        from rewriter.paths import is_data_file_of

        protected = {os.path.realpath(p) for p in self._model.meta.get(META_DATA_FILES) or []}
        legacy = f"{self.out.name}.data"
        for entry in self.out.parent.iterdir():
            name = entry.name
            if name in (self.data_name, legacy) or not is_data_file_of(name, self.out.name):
                continue
            if os.path.realpath(entry) in protected:
                continue
            with contextlib.suppress(OSError):
                entry.unlink()

    def discard(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def stage(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None
          ) -> StagedModel:
    """Serialize and validate `model` for `path` in a temp folder (see `StagedModel`)."""
    from rewriter.atomic import make_temp_dir
    from rewriter.finite import new_nonfinite_tensors

    out = Path(path).expanduser().absolute()
    _refuse_unsafe_target(model, out)
    problem = conv_weight_problem(model)
    if problem:
        raise ModelSaveError(f"{out}: rewritten model is invalid: {problem}")
    bad = new_nonfinite_tensors(model)
    if bad:
        raise ModelSaveError(f"{out}: refusing to save {bad[0][0]} with {bad[0][1]} NaN/inf "
                             "values; nothing written")
    if external_data is None:
        external_data = _has_external_tensors(model) or _initializer_bytes(model) > PROTOBUF_LIMIT
    try:
        tmp_dir = make_temp_dir(out.parent)
    except OSError as exc:
        raise ModelSaveError(f"{out}: cannot write ({exc.strerror or exc})") from None
    staged = StagedModel(model, out, tmp_dir, None)
    _list_initializers_as_inputs(model)
    try:
        tmp_model = tmp_dir / out.name
        plain_data = f"{out.name}.data" if external_data else None
        try:
            with _no_initializer_value_info(model):
                ir.save(model, tmp_model, external_data=plain_data)
        except Exception as exc:
            raise ModelSaveError(f"{out}: cannot serialize model: {_first_line(exc)}") from None
        if plain_data and (tmp_dir / plain_data).exists():
            if (tmp_dir / plain_data).stat().st_size == 0:  # every tensor small enough inline
                (tmp_dir / plain_data).unlink()
            else:
                staged.data_name = _name_data_by_hash(tmp_model, plain_data)
        validate_file(tmp_model, label=str(out), custom_domains=_custom_domains(model))
    except BaseException:
        staged.discard()
        raise
    return staged


def _list_initializers_as_inputs(model: ir.Model) -> None:
    """IR version 3 requires every initializer to be a graph input too; a pass that added one
    (deepen's identity weights) would otherwise make a valid IR-3 model invalid."""
    if model.ir_version is None or model.ir_version >= 4:
        return
    graph = model.graph
    listed = set(graph.inputs)
    for value in graph.initializers.values():
        if value not in listed:
            graph.inputs.append(value)


def _name_data_by_hash(tmp_model: Path, plain: str) -> str:
    """Rename the staged data file to `<model>.<sha256[:8]>.data` and point the model at it."""
    import hashlib

    from rewriter.paths import data_file_name

    digest = hashlib.sha256()
    with open(tmp_model.parent / plain, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            digest.update(block)
    name = data_file_name(tmp_model.name, digest.hexdigest())
    os.replace(tmp_model.parent / plain, tmp_model.parent / name)
    proto = onnx.load(str(tmp_model), load_external_data=False)
    for _, tensor in _all_tensor_protos(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == plain:
                entry.value = name
    tmp_model.write_bytes(proto.SerializeToString())
    return name


@contextlib.contextmanager
def _no_initializer_value_info(model: ir.Model) -> Iterator[None]:
    """Serialize initializers without a value_info entry (their tensor already says it all).

    onnx-ir writes one for every typed initializer; tools that rewrite weights afterwards
    (onnxruntime's quantizer transposes Gemm weights) then trip over the stale entry.
    """
    saved: list[tuple[ir.Value, Any, Any]] = []
    for graph in model.graphs():
        inputs = set(graph.inputs)
        for value in graph.initializers.values():
            if value not in inputs and value.const_value is not None:
                saved.append((value, value.shape, value.type))
                value.shape, value.type = None, None
    try:
        yield
    finally:
        for value, shape, type_ in saved:
            value.type, value.shape = type_, shape


def validate_file(path: Path, *, label: str, custom_domains: set[str] | None = None) -> None:
    """onnx.checker full check, then an onnxruntime session (skipped above a size limit)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ModelSaveError(
            f"{label}: rewritten model fails onnx.checker: {_first_line(exc)}"
        ) from None
    total = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
    if total > SESSION_CHECK_LIMIT:
        logger.warning("%s: %d bytes, onnxruntime session check skipped", label, total)
        return
    import onnxruntime as ort  # local: keeps `import rewriter` light

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures reach the user as our one line, not ORT's log
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if custom_domains:
            logger.warning(
                "%s: onnxruntime cannot load it (custom domains %s); session check skipped",
                label,
                sorted(custom_domains),
            )
            return
        raise ModelSaveError(
            f"{label}: onnxruntime cannot load the rewritten model: {_first_line(exc)}"
        ) from None


def _refuse_unsafe_target(model: ir.Model, out: Path) -> None:
    from rewriter.paths import output_problem

    problem = output_problem(out)
    if problem:
        raise ModelSaveError(f"{out}: output path {problem}")
    protected = {model.meta.get(META_SOURCE)} | set(model.meta.get(META_DATA_FILES) or [])
    protected.discard(None)
    from rewriter.paths import is_data_file_of

    for p in protected:
        target = Path(p).resolve()
        if out.resolve() == target or (
            target.parent == out.resolve().parent and is_data_file_of(target.name, out.name)
        ):
            raise ModelSaveError(
                f"{out}: refusing to overwrite the input model or its data file ({p})"
            )


def _output_modes(model: ir.Model) -> tuple[int, int]:
    """(model, data file) permission bits: the input's when known (never wider: the data file
    also keeps its own input's restrictions), else the umask default."""
    umask = os.umask(0)
    os.umask(umask)
    default = 0o666 & ~umask
    source = model.meta.get(META_SOURCE)
    model_mode = os.stat(source).st_mode & 0o777 if source and os.path.exists(source) else default
    data_mode = model_mode
    for data in model.meta.get(META_DATA_FILES) or []:
        if os.path.exists(data):
            data_mode &= os.stat(data).st_mode & 0o777
    return model_mode, data_mode


def _has_external_tensors(model: ir.Model) -> bool:
    return any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)
