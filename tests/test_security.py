"""Reads stay inside the model's folder, writes are atomic and never clobber the input.

External-data locations that are absolute or escape the folder (`../`, symlinks) are refused
before anything opens them: the targets here are FIFOs, which would block any read, so a
regression hangs the (time-limited) subprocess instead of passing quietly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter.errors import ModelLoadError, ModelSaveError
from tests.builders import conv_model
from tests.conftest import ROOT
from tests.harden_helpers import data_files, hashed_data_files
from tests.test_bad_input import assert_one_line_error, rewrite_cli

# ------------------------------------------------------------------------ external data


def external_tensor(name: str, dims, location: str, length: int | None = None):
    """A float tensor header pointing at external data (no bytes of its own)."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims),
                         data_location=TensorProto.EXTERNAL)
    entries = {"location": location, "offset": "0"}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    return tensor


def external_model(folder: Path, location: str, *, dims=(8, 4, 3, 3), length: int | None = None,
                   write_data: bool = True) -> Path:
    """A Conv model whose weight W lives in external data at `location` (written verbatim)."""
    proto = conv_model([1, 4, 8, 8], dims[0], list(dims[2:]), pads=[1, 1, 1, 1], bias=False)
    data = numpy_helper.to_array(proto.graph.initializer[0]).tobytes()
    proto.graph.initializer[0].CopyFrom(external_tensor("W", dims, location, length))
    if write_data:
        target = Path(location) if os.path.isabs(location) else folder / location
        if not target.exists():
            target.write_bytes(data)
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.fixture
def layout(tmp_path):
    """tmp/model/ holds the model; tmp/outside/fifo is a FIFO no read may touch."""
    model_dir, outside = tmp_path / "model", tmp_path / "outside"
    model_dir.mkdir()
    outside.mkdir()
    fifo = outside / "fifo"
    os.mkfifo(fifo)
    return model_dir, outside, fifo


def _refused(path: Path, needle: str) -> None:
    """CLI in a subprocess (a read of the FIFO would hang it until the timeout), then API."""
    try:
        result = rewrite_cli(path, "--analyze", timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("load blocked reading an external-data target it should have refused")
    assert_one_line_error(result, needle)
    with pytest.raises(ModelLoadError, match=needle):
        rewriter.load(path)


def test_absolute_location_refused(layout):
    model_dir, _, fifo = layout
    _refused(external_model(model_dir, str(fifo), write_data=False), "absolute")


def test_parent_location_refused(layout):
    model_dir, _, _ = layout
    _refused(external_model(model_dir, "../outside/fifo", write_data=False), "outside")


def test_symlink_escaping_refused(layout):
    model_dir, _, fifo = layout
    (model_dir / "weights.data").symlink_to(fifo)
    _refused(external_model(model_dir, "weights.data", write_data=False), "outside")


def test_symlinked_folder_escaping_refused(layout):
    model_dir, outside, _ = layout
    (model_dir / "sub").symlink_to(outside, target_is_directory=True)
    _refused(external_model(model_dir, "sub/fifo", write_data=False), "outside")


def test_fifo_inside_folder_refused(layout):
    """Not a regular file: refused by stat, never opened."""
    model_dir, _, _ = layout
    os.mkfifo(model_dir / "w.data")
    _refused(external_model(model_dir, "w.data", write_data=False), "missing")


def test_escape_refused_when_loaded_by_bare_name(layout, monkeypatch):
    """onnx-ir skips its own check for a bare file name; ours resolves the path first."""
    model_dir, _, _ = layout
    external_model(model_dir, "../outside/fifo", write_data=False)
    monkeypatch.chdir(model_dir)
    with pytest.raises(ModelLoadError, match="outside"):
        rewriter.load("model.onnx")


def test_external_data_from_bytes_refused(tmp_path):
    path = external_model(tmp_path, "w.data")
    with pytest.raises(ModelLoadError, match="from its file path"):
        rewriter.load(path.read_bytes())


def test_inside_location_accepted(tmp_path):
    """Control: `sub/../w.data` stays inside the folder; it loads, saves and runs."""
    (tmp_path / "sub").mkdir()
    path = external_model(tmp_path, "sub/../w.data")
    assert rewriter.load(path).graph.initializers["W"].const_value.numpy().shape == (8, 4, 3, 3)
    rewriter.save(rewriter.load(path), tmp_path / "out" / "m.onnx")


def test_symlink_inside_folder_refused_clearly(tmp_path):
    """onnx's checker refuses external data behind any link; we say so in plain words."""
    (tmp_path / "sub").mkdir()
    external_model(tmp_path / "sub", "real.data")
    (tmp_path / "link.data").symlink_to(tmp_path / "sub" / "real.data")
    with pytest.raises(ModelLoadError, match="symbolic link"):
        rewriter.load(external_model(tmp_path, "link.data", write_data=False))


def test_external_data_shorter_than_declared(tmp_path):
    path = external_model(tmp_path, "w.data")
    with open(tmp_path / "w.data", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ModelLoadError, match="shorter than declared"):
        rewriter.load(path)


# ------------------------------------------------------------------------ absurd sizes

ABSURD = (1_000_000, 1_000_000)  # 10^12 float32 elements: 4 TB


def _absurd_inline(tmp_path: Path, *, where: str) -> Path:
    """A 10^12-element tensor header with no data, as an initializer or a Constant node."""
    tensor = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=list(ABSURD))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if where == "initializer":
        nodes, inits = [helper.make_node("Add", ["x", "big"], ["y"], name="add")], [tensor]
    else:
        nodes = [helper.make_node("Constant", [], ["big"], name="const", value=tensor),
                 helper.make_node("Add", ["x", "big"], ["y"], name="add")]
        inits = []
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "absurd.onnx"
    path.write_bytes(model.SerializeToString())
    return path


_PEAK_RSS_SCRIPT = """
import resource, sys
import rewriter
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    rewriter.load(sys.argv[1])
except rewriter.ModelLoadError as exc:
    print("refused:", exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("peak_growth_kib", after - before)
"""


def _load_in_subprocess(path: Path) -> tuple[str, int]:
    """Refusal message and peak-RSS growth (KiB) of a fresh process loading `path`."""
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(path)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines, result.stderr
    growth = int(lines[-1].split()[-1])
    return "\n".join(lines[:-1]), growth


@pytest.mark.parametrize("where", ["initializer", "constant"])
def test_absurd_inline_size_fails_fast(tmp_path, where):
    message, growth_kib = _load_in_subprocess(_absurd_inline(tmp_path, where=where))
    assert "refused:" in message and "declares shape [1000000, 1000000]" in message
    assert growth_kib < 200 * 1024  # nothing near the 4 TB the header asks for


@pytest.mark.parametrize("length", [None, 4 * 10**12])
def test_absurd_external_size_fails_fast(tmp_path, length):
    path = external_model(tmp_path, "w.data", dims=(1_000_000, 1_000_000, 1, 1), length=length)
    message, growth_kib = _load_in_subprocess(path)
    assert "refused:" in message and "shorter than declared" in message
    assert growth_kib < 200 * 1024


def test_file_over_protobuf_limit_refused_before_reading(tmp_path):
    """A >2 GiB .onnx cannot be a valid protobuf; refused by size (sparse file: no disk used)."""
    path = tmp_path / "huge.onnx"
    with open(path, "wb") as f:
        f.truncate(2**31 + 10)
    message, growth_kib = _load_in_subprocess(path)
    assert "over protobuf's 2 GiB limit" in message
    assert growth_kib < 200 * 1024


def test_overflowing_dims_refused(tmp_path):
    """dims whose product overflows int64 must not wrap around to a small size."""
    tensor = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[2**40, 2**40])
    proto = conv_model([1, 4, 8, 8], 8, [3, 3])
    proto.graph.initializer.append(tensor)
    with pytest.raises(ModelLoadError, match="declares shape"):
        rewriter.load(proto.SerializeToString())


def test_negative_dims_refused():
    proto = conv_model([1, 4, 8, 8], 8, [3, 3])
    proto.graph.initializer[0].dims[0] = -8
    with pytest.raises(ModelLoadError, match="negative dimension"):
        rewriter.load(proto.SerializeToString())


# ------------------------------------------------------------------------------ writes


@pytest.fixture
def model_file(tmp_path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(conv_model([1, 4, 8, 8], 8, [3, 3], pads=[1, 1, 1, 1]), path)
    return path


def test_output_equal_to_input_refused(model_file):
    before = model_file.read_bytes()
    for spelling in (model_file, model_file.parent / "." / "sub" / ".." / model_file.name):
        with pytest.raises(ModelSaveError, match="refusing to overwrite the input"):
            rewriter.save(rewriter.load(model_file), spelling)
    link = model_file.parent / "link.onnx"
    link.symlink_to(model_file)
    with pytest.raises(ModelSaveError, match="refusing to overwrite the input"):
        rewriter.save(rewriter.load(model_file), link)
    assert model_file.read_bytes() == before


def test_output_equal_to_input_refused_by_cli(model_file):
    before = model_file.read_bytes()
    result = rewrite_cli(model_file, "--pass", "cleanup", "-o", model_file)
    assert_one_line_error(result, "refusing to overwrite the input", code=2)  # usage, up front
    assert model_file.read_bytes() == before


def test_output_directory_refused(model_file, tmp_path):
    (tmp_path / "outdir").mkdir()
    with pytest.raises(ModelSaveError, match="is a directory"):
        rewriter.save(rewriter.load(model_file), tmp_path / "outdir")
    assert_one_line_error(rewrite_cli(model_file, "--pass", "cleanup", "-o", tmp_path / "outdir"),
                          "directory", code=2)


def test_output_data_file_never_the_inputs(tmp_path):
    """Input `a.onnx` keeps its weights in `b.onnx.data`: saving to `b.onnx` would clobber it."""
    proto = conv_model([1, 4, 8, 8], 8, [3, 3])
    onnx.save(proto, tmp_path / "a.onnx", save_as_external_data=True, location="b.onnx.data",
              size_threshold=0)
    data = (tmp_path / "b.onnx.data").read_bytes()
    with pytest.raises(ModelSaveError, match="its data file"):
        rewriter.save(rewriter.load(tmp_path / "a.onnx"), tmp_path / "b.onnx")
    assert (tmp_path / "b.onnx.data").read_bytes() == data
    assert not (tmp_path / "b.onnx").exists()


def _temp_dirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".onexone-")]


def _invalid(model_file: Path) -> ir.Model:
    """A model that fails onnx.checker once written (an op the standard domain lacks)."""
    model = rewriter.load(model_file)
    next(iter(model.graph)).op_type = "NotAnOp"
    return model


def test_failed_validation_leaves_nothing(model_file, tmp_path):
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(ModelSaveError, match="onnx.checker"):
        rewriter.save(_invalid(model_file), out)
    assert not out.exists() and _temp_dirs(out.parent) == []


def test_failed_validation_keeps_previous_output(model_file, tmp_path):
    out = tmp_path / "previous.onnx"
    out.write_bytes(b"previous output")
    with pytest.raises(ModelSaveError):
        rewriter.save(_invalid(model_file), out)
    assert out.read_bytes() == b"previous output" and _temp_dirs(tmp_path) == []


def test_failed_onnxruntime_check_leaves_nothing(model_file, tmp_path):
    """Passes the checker (com.microsoft is not onnx's to check) but onnxruntime refuses it."""
    model = rewriter.load(model_file)
    node = next(iter(model.graph))
    node.domain, node.op_type = "com.microsoft", "NotAContribOp"
    model.graph.opset_imports["com.microsoft"] = 1
    out = tmp_path / "ort.onnx"
    with pytest.raises(ModelSaveError, match="onnxruntime cannot load"):
        rewriter.save(model, out)
    assert not out.exists() and _temp_dirs(tmp_path) == []


def test_failed_external_save_leaves_no_data_file(tmp_path):
    proto = conv_model([1, 4, 8, 8], 8, [3, 3])
    onnx.save(proto, tmp_path / "a.onnx", save_as_external_data=True, location="a.onnx.data",
              size_threshold=0)
    out = tmp_path / "out.onnx"
    with pytest.raises(ModelSaveError):
        rewriter.save(_invalid(tmp_path / "a.onnx"), out)
    assert not out.exists() and hashed_data_files(tmp_path, "out.onnx") == []
    assert _temp_dirs(tmp_path) == []


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_permissions_never_widened(tmp_path, mode):
    proto = conv_model([1, 4, 8, 8], 8, [3, 3])
    onnx.save(proto, tmp_path / "a.onnx", save_as_external_data=True, location="a.onnx.data",
              size_threshold=0)
    os.chmod(tmp_path / "a.onnx", mode)
    os.chmod(tmp_path / "a.onnx.data", 0o644)
    out = rewriter.save(rewriter.load(tmp_path / "a.onnx"), tmp_path / "out.onnx")
    for written in (out, *data_files(out)):
        assert written.stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("model_mode, data_mode", [(0o644, 0o600), (0o640, 0o604)])
def test_data_file_keeps_its_own_restrictions(tmp_path, model_mode, data_mode):
    """A 0600 input data file beside a 0644 model: the output data file stays 0600."""
    proto = conv_model([1, 4, 8, 8], 8, [3, 3])
    onnx.save(proto, tmp_path / "a.onnx", save_as_external_data=True, location="a.onnx.data",
              size_threshold=0)
    os.chmod(tmp_path / "a.onnx", model_mode)
    os.chmod(tmp_path / "a.onnx.data", data_mode)
    out = rewriter.save(rewriter.load(tmp_path / "a.onnx"), tmp_path / "out.onnx")
    assert out.stat().st_mode & 0o777 == model_mode
    (data,) = data_files(out)
    assert data.stat().st_mode & 0o777 == model_mode & data_mode


def test_permissions_from_bytes_follow_umask(tmp_path):
    old = os.umask(0o077)
    try:
        out = rewriter.save(rewriter.load(conv_model([1, 4, 8, 8], 8, [3, 3])),
                            tmp_path / "out.onnx")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o600


def test_temp_dir_is_private_while_validating(model_file, tmp_path, monkeypatch):
    """Nothing half-written is readable by others: the temp folder is 0700."""
    from rewriter import io as rio

    seen = []
    original = rio.validate_file

    def spy(path, **kw):
        seen.append(path.parent.stat().st_mode & 0o777)
        return original(path, **kw)

    monkeypatch.setattr(rio, "validate_file", spy)
    rewriter.save(rewriter.load(model_file), tmp_path / "out.onnx")
    assert seen == [0o700]


def test_random_weights_model_round_trips_after_refusals(model_file, tmp_path):
    """Control for the write tests: the same model saves fine to a fresh path."""
    out = rewriter.save(rewriter.load(model_file), tmp_path / "fresh.onnx")
    assert np.array_equal(
        numpy_helper.to_array(onnx.load(str(out)).graph.initializer[0]),
        numpy_helper.to_array(onnx.load(str(model_file)).graph.initializer[0]),
    )
