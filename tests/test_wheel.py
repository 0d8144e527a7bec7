"""The wheel, installed into a fresh venv outside the repository, works on its own.

Builds the wheel (no build isolation: offline and fast), installs it with --no-deps into a new
venv, then makes the already installed dependencies visible through a .pth file (added after
the install, so pip never sees or touches this checkout's own install). Runs from a temp folder,
so nothing of the repository is importable there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.builders import conv_model
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _run(cmd: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(venv bin folder, a working folder outside the repository)."""
    work = tmp_path_factory.mktemp("wheel")
    dist = work / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(dist)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(dist.glob("onexone-*.whl"))
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # this pip installs into it (--python)
    bin_dir = env_dir / "bin"
    install = _run([sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "-q",
                    "--no-deps", "--no-index", wheel], cwd=work)
    assert install.returncode == 0, install.stderr
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return bin_dir, work


def test_the_wheel_holds_one_namespace_and_its_data(installed):
    bin_dir, work = installed
    probe = (
        "import importlib.util as u, json, sys, rewriter, rewriter.passes\n"
        "from rewriter.resources import trained_dir, report_schema_path\n"
        "print(json.dumps({'file': rewriter.__file__, 'passes': rewriter.passes.__file__,"
        " 'models': u.find_spec('models') is not None, 'top_passes': u.find_spec('passes')"
        " is not None, 'ort': 'onnxruntime' in sys.modules, 'trained': str(trained_dir()),"
        " 'schema': report_schema_path().is_file()}))"
    )
    out = _run([bin_dir / "python", "-c", probe], cwd=work)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout)
    venv_dir = str(bin_dir.parent)
    assert facts["file"].startswith(venv_dir) and facts["passes"].startswith(venv_dir)
    assert facts["models"] is False and facts["top_passes"] is False  # no colliding names
    assert facts["ort"] is False  # importing the package starts no onnxruntime
    assert facts["trained"].startswith(venv_dir) and facts["schema"] is True
    assert (Path(facts["trained"]) / "digits_cnn.onnx").is_file()
    for name in ("models", "passes"):
        failed = _run([bin_dir / "python", "-c", f"import {name}"], cwd=work)
        assert failed.returncode == 1 and "ModuleNotFoundError" in failed.stderr


def test_installed_rewrite_command_runs_help_rewrite_and_image_calibration(installed):
    from PIL import Image

    bin_dir, work = installed
    rewrite = bin_dir / "rewrite"
    helped = _run([rewrite, "--help"], cwd=work)
    assert helped.returncode == 0 and "--report-schema" in helped.stdout
    schema = _run([rewrite, "--report-schema"], cwd=work)
    assert json.loads(schema.stdout)["title"]
    out = _run([bin_dir / "python", "-c",
                "from rewriter.resources import trained_dir; print(trained_dir())"], cwd=work)
    trained = Path(out.stdout.strip())
    digits = _run([rewrite, trained / "digits_cnn.onnx", "--pass", "fold-bn", "--pass",
                   "bottleneck:ratio=0.5,init=svd", "-o", work / "digits.onnx",
                   "--report", work / "r.json"], cwd=work)  # data-free: seconds, not a refit
    assert digits.returncode == 0, digits.stderr
    report = json.loads((work / "r.json").read_text())
    assert report["macs_after"] < report["macs_before"] and report["written"] is True
    onnx.checker.check_model(onnx.load(str(work / "digits.onnx")), full_check=True)

    onnx.save(conv_model([1, 3, 12, 12], 16, [3, 3], pads=[1, 1, 1, 1]), str(work / "m.onnx"))
    images = work / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    folder = _run([rewrite, work / "m.onnx", "--pass", "cleanup", "--calib", images,
                   "--preprocess", "size=12,mean=0.5+0.5+0.5,std=0.25+0.25+0.25",
                   "--report", work / "i.json"], cwd=work)
    assert folder.returncode == 0, folder.stderr
    assert json.loads((work / "i.json").read_text())["fidelity"]["samples"] == 2
