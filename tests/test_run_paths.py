"""No path a run reads is ever written, and outputs never replace special files or each other.

Each case is a real CLI run (in-process, fd-level capture) that the review found destroying an
input or a device: it must end with exit 2 and one line before any work, every file in the
folder unchanged. FIFOs stand in for devices (made in a temp dir; real devices are never used).
"""

from __future__ import annotations

import os

import pytest

from tests.harden_helpers import calib_npz, run_main, small_model, snapshot
from tests.test_bad_input import assert_one_line_error


@pytest.fixture
def folder(tmp_path):
    small_model(tmp_path, "m.onnx", external=True)
    calib_npz(tmp_path)
    (tmp_path / "run.toml").write_text('[[pass]]\nname = "cleanup"\n')
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "adir").mkdir()
    return tmp_path


CASES = {
    "report over model": (["--report", "{d}/m.onnx"], "input model"),
    "report over model data": (["--report", "{d}/m.onnx.data"], "data file"),
    "report over output": (["-o", "{d}/o.onnx", "--report", "{d}/o.onnx"], "same file"),
    "output over calib": (["--calib", "{d}/calib.npz", "-o", "{d}/calib.npz"], "--calib"),
    "report over calib": (["--calib", "{d}/calib.npz", "--report", "{d}/calib.npz"], "--calib"),
    "output over config": (["--config", "{d}/run.toml", "-o", "{d}/run.toml"], "--config"),
    "output over fifo": (["-o", "{d}/fifo"], "FIFO"),
    "report over fifo": (["--report", "{d}/fifo"], "FIFO"),
    "plot over fifo": (["--plot", "{d}/fifo"], "FIFO"),
    "output under a file": (["-o", "{d}/afile/out.onnx"], "which is a file"),
    "report into a directory": (["--report", "{d}/adir"], "directory"),
    "plot equals report": (["--report", "{d}/r.json", "--plot", "{d}/r.json"], "same file"),
    "output via dotdot": (["-o", "{d}/adir/../m.onnx"], "input model"),
    "report is the output's data": (["-o", "{d}/o.onnx", "--report", "{d}/o.onnx.data"],
                                    "data file"),
    "output in /proc": (["-o", "/proc/onexone-test.onnx"], "does not take new files"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_overlapping_or_special_outputs_refused(folder, capfd, case):
    extra, needle = CASES[case]
    args = [a.format(d=folder) for a in extra]
    if "--config" not in args:
        args += ["--pass", "cleanup"]
    before = snapshot(folder)
    result = run_main(capfd, folder / "m.onnx", *args)
    assert_one_line_error(result, needle, code=2)
    assert snapshot(folder) == before  # nothing written, nothing replaced, no temp left


def test_links_and_hard_links_to_inputs_refused(folder, capfd):
    (folder / "soft.onnx").symlink_to(folder / "m.onnx.data")
    os.link(folder / "calib.npz", folder / "hard.npz")
    before = snapshot(folder)
    for target in ("soft.onnx", "hard.npz"):
        result = run_main(capfd, folder / "m.onnx", "--pass", "cleanup", "--calib",
                          folder / "calib.npz", "--report", folder / target)
        assert_one_line_error(result, "refusing to overwrite", code=2)
    assert snapshot(folder) == before


def test_analyze_report_over_model_refused(folder, capfd):
    before = snapshot(folder)
    result = run_main(capfd, folder / "m.onnx", "--analyze", "--report", folder / "m.onnx")
    assert_one_line_error(result, "input model", code=2)
    assert snapshot(folder) == before


def test_output_inside_calibration_folder_refused(tmp_path, capfd):
    model = small_model(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    result = run_main(capfd, model, "--pass", "cleanup", "--calib", images,
                      "--plot", images / "plot.png")
    assert_one_line_error(result, "--calib", code=2)


def test_distinct_outputs_still_written(folder, capfd):
    """Control: the same run with separate paths succeeds and leaves the inputs alone."""
    inputs = {k: v for k, v in snapshot(folder).items() if "out" not in k}
    result = run_main(capfd, folder / "m.onnx", "--pass", "cleanup", "--calib",
                      folder / "calib.npz", "-o", folder / "out" / "o.onnx",
                      "--report", folder / "out" / "r.json")
    assert result.returncode == 0, result.stderr
    assert (folder / "out" / "o.onnx").is_file() and (folder / "out" / "r.json").is_file()
    after = snapshot(folder)
    assert all(after[k] == v for k, v in inputs.items())
