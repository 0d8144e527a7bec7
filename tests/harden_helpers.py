"""Helpers for the hardening tests: in-process CLI runs with fd-level capture, file snapshots."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import onnx

from rewriter.cli import main
from tests.builders import conv_model


def run_main(capfd, *args: str | Path) -> subprocess.CompletedProcess:
    """`rewrite ARGS` in this process; stdout and stderr as a CompletedProcess."""
    capfd.readouterr()
    code = main([str(a) for a in args])
    captured = capfd.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Content hash of every regular file under `folder` (FIFOs and links named, not read)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_symlink():
            out[str(p)] = "link"
        elif p.is_file():
            out[str(p)] = digest(p)
        elif p.exists() and not p.is_dir():
            out[str(p)] = "special"
    return out


def small_model(folder: Path, name: str = "m.onnx", *, external: bool = False) -> Path:
    """conv+relu model [n,4,8,8] (dynamic batch); with `external`, weights in `NAME.data`."""
    proto = conv_model(["n", 4, 8, 8], 8, [3, 3], pads=[1, 1, 1, 1], relu=True)
    path = Path(folder) / name
    if external:
        onnx.save(proto, path, save_as_external_data=True, location=f"{name}.data",
                  size_threshold=0)
    else:
        onnx.save(proto, path)
    return path


def calib_npz(folder: Path, n: int = 8, name: str = "calib.npz", **arrays) -> Path:
    """`x` samples for `small_model` (or the given arrays) in an .npz."""
    rng = np.random.default_rng(0)
    data = arrays or {"x": rng.standard_normal((n, 4, 8, 8)).astype(np.float32)}
    path = Path(folder) / name
    np.savez(path, **data)
    return path


def data_files(model_path: Path) -> list[Path]:
    """The external data files `model_path` refers to, in its folder (read from the model)."""
    proto = onnx.load(str(model_path), load_external_data=False)
    names = {e.value for t in proto.graph.initializer for e in t.external_data
             if e.key == "location"}
    return sorted(Path(model_path).parent / n for n in names)


def hashed_data_files(folder: Path, output_name: str) -> list[Path]:
    """Data files the tool may have written for output `output_name` (`NAME.<hash8>.data`)."""
    from rewriter.paths import is_data_file_of

    return sorted(p for p in Path(folder).iterdir() if is_data_file_of(p.name, output_name))
