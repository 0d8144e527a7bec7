"""Every `rewrite` flag, through a subprocess and through the Python API.

Subprocess runs use `python -m tests.cli_entry` (the real `main` plus two test-only passes:
`test-perturb` moves outputs by a known amount so gates can pass or fail on purpose,
`test-identity` is exact); the installed `rewrite` script is exercised with the real passes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter
from rewriter.cli import main
from tests.builders import conv_model, make_model
from tests.conftest import ROOT, ort_run

REWRITE = Path(sys.executable).with_name("rewrite")


def cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`rewrite ARGS` with the test passes registered; text output captured."""
    cmd = [sys.executable, "-m", "tests.cli_entry", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=300)


def real_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(REWRITE), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def classifier(path: Path, batch: int | str = "N", classes: int = 5, seed: int = 0) -> Path:
    """x[batch,3,12,12] -> Conv3x3 -> Relu -> GAP -> Flatten -> Gemm -> logits[batch, classes]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "W"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "B"),
        numpy_helper.from_array(_centered(rng.standard_normal((classes, 8))), "G"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "GB"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "G", "GB"], ["logits"], name="fc", transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 12, 12])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])
    onnx.save(make_model(nodes, [x], [y], inits), str(path))
    return path


def _centered(g: np.ndarray) -> np.ndarray:
    """Rows with equal sums: the class then depends on the input, not on a constant offset."""
    return (g - g.mean(axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def model(tmp_path) -> Path:
    return classifier(tmp_path / "model.onnx")


@pytest.fixture
def calib(tmp_path, model) -> Path:
    """24 samples with labels = the original model's own argmax on half, shuffled on the rest."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((24, 3, 12, 12)) + rng.normal(0, 2, (24, 3, 1, 1))).astype(np.float32)
    labels = np.argmax(ort_run(model, {"x": x})[0], axis=1)
    labels[::2] = (labels[::2] + 1) % 5
    path = tmp_path / "calib.npz"
    np.savez(path, x=x, labels=labels)
    return path


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rewrite: error:"), proc.stderr
    return lines[0]


def conv_weight(path: Path, node: str = "conv") -> np.ndarray:
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    conv = next(n for n in proto.graph.node if n.name == node)
    return inits[conv.input[1]]


# ------------------------------------------------------------------------- informational flags


def test_version_and_help_through_installed_script():
    version = real_cli("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"onexone {rewriter.__version__}"
    helped = real_cli("--help")
    assert helped.returncode == 0
    for flag in ("--pass", "--output", "--config", "--calib", "--preprocess", "--input-shape",
                 "--report", "--dry-run", "--analyze", "--json", "--list-passes", "--max-drop",
                 "--min-cosine", "--min-speedup", "--keep-failed", "--bench", "--threads",
                 "--batch", "--plot", "--version"):
        assert flag in helped.stdout, flag
    assert main(["--version"]) == 0


def test_list_passes_shows_options_and_defaults(capsys):
    import tests.passes_for_tests  # noqa: F401

    proc = cli("--list-passes")
    assert proc.returncode == 0
    assert "test-perturb" in proc.stdout and "eps=0.01" in proc.stdout
    real = real_cli("--list-passes")
    assert real.returncode == 0
    from rewriter.passes import available

    for name in available():
        if not name.startswith("test-"):
            assert name in real.stdout
    assert main(["--list-passes"]) == 0
    assert "test-perturb" in capsys.readouterr().out


def test_analyze_and_json_on_stdout_only(model, tmp_path):
    table = cli(model, "--analyze")
    assert table.returncode == 0 and "conv" in table.stdout
    proc = cli(model, "--analyze", "--json")
    assert proc.returncode == 0
    data = json.loads(proc.stdout)  # nothing but JSON on stdout
    assert isinstance(data["total_macs"], int) and data["total_macs"] > 0
    assert all(isinstance(r["macs"], int) for r in data["layers"] if r["macs"] is not None)
    conv = next(r for r in data["layers"] if r["node"] == "conv")
    assert conv["macs"] == 12 * 12 * 8 * 3 * 9
    assert list(tmp_path.iterdir()) == [model]  # analyze writes nothing


# ------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize("args", [
    [],                                             # no model
    ["{model}", "--bogus"],                         # unknown flag
    ["{model}", "--threads", "two"],                # bad value
    ["{model}"],                                    # nothing to do
    ["{model}", "--pass", "test-identity", "--input-shape", "x=1,3"],
    ["{model}", "--pass", ":eps=1"],                # pass without a name
])
def test_usage_errors_exit_2(model, args):
    proc = cli(*[a.format(model=model) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert "error" in proc.stderr


def test_bad_input_exits_1_with_one_line(model, tmp_path):
    missing = cli(tmp_path / "nope.onnx", "--pass", "test-identity")
    assert missing.returncode == 1 and "nope.onnx" in one_line_error(missing)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    bad = cli(garbage, "--pass", "test-identity")
    assert bad.returncode == 1 and "garbage.onnx" in one_line_error(bad)
    # an unknown pass or a bad option is a usage mistake (exit 2), still one line
    unknown = cli(model, "--pass", "no-such-pass")
    assert unknown.returncode == 2 and "no-such-pass" in one_line_error(unknown)
    bad_option = cli(model, "--pass", "test-perturb:eps=abc")
    assert bad_option.returncode == 2 and "eps" in one_line_error(bad_option)
    no_calib = cli(model, "--pass", "test-identity", "--calib", tmp_path / "none.npz")
    assert no_calib.returncode == 1 and "none.npz" in one_line_error(no_calib)
    assert list(tmp_path.glob("*.rewritten.onnx")) == []


# ------------------------------------------------------------------------- passes and outputs


def test_default_output_name_and_dash_o(model, tmp_path):
    proc = cli(model, "--pass", "test-perturb")
    assert proc.returncode == 0, proc.stderr
    default = tmp_path / "model.rewritten.onnx"
    assert default.exists()
    onnx.checker.check_model(onnx.load(str(default)), full_check=True)
    out = tmp_path / "sub" / "custom.onnx"
    assert cli(model, "--pass", "test-perturb", "-o", out).returncode == 0
    assert out.read_bytes() == default.read_bytes()


def test_passes_repeat_and_run_in_order(model, tmp_path, calib):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = cli(model, "--pass", "test-perturb:eps=0.1", "--pass", "test-identity",
               "--pass", "test-perturb:eps=0.5", "-o", out, "--report", report, "--calib", calib)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert [p["name"] for p in data["passes"]] == ["test-perturb", "test-identity", "test-perturb"]
    assert [p["options"].get("eps") for p in data["passes"]] == [0.1, None, 0.5]
    assert data["options"]["passes"] == ["test-perturb:eps=0.1", "test-identity",
                                         "test-perturb:eps=0.5"]
    np.testing.assert_allclose(conv_weight(out), conv_weight(model) * 1.1 * 1.5, rtol=1e-6)
    x = np.load(calib)["x"][:3]
    got = ort_run(out, {"x": x})[0]
    assert got.shape == (3, 5) and np.isfinite(got).all()


def test_dry_run_writes_nothing(model, tmp_path):
    before = sorted(tmp_path.iterdir())
    proc = cli(model, "--pass", "test-perturb", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "test-perturb" in proc.stdout and "dry run" in proc.stdout
    assert sorted(tmp_path.iterdir()) == before


def test_report_json_and_markdown(model, calib, tmp_path):
    rj, rm = tmp_path / "r.json", tmp_path / "r.md"
    proc = cli(model, "--pass", "test-perturb:eps=0.02", "--calib", calib, "--report", rj,
               "--report", rm)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(rj.read_text())
    assert data["written"] is True and data["output"].endswith("model.rewritten.onnx")
    assert isinstance(data["macs_before"], int) and data["macs_before"] == data["macs_after"] > 0
    fid = data["fidelity"]
    assert set(fid["outputs"]) == {"logits"}
    assert fid["samples"] == 6  # 25% of 24 held out
    assert 0.99 < fid["cosine"] < 1.0 and fid["rel_l2"] > 0
    assert "accuracy_before" in fid and "top1_agreement" in fid
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "docs" / "report-schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(data)
    md = rm.read_text()
    assert md.startswith("# onexone report") and "test-perturb" in md and "accuracy" in md


# ------------------------------------------------------------------------- calibration


def test_calib_npz_labels_give_accuracy(model, calib, tmp_path):
    report = tmp_path / "r.json"
    assert cli(model, "--pass", "test-perturb:eps=0.001", "--calib", calib, "--report",
               report).returncode == 0
    fid = json.loads(report.read_text())["fidelity"]
    data = np.load(calib)
    fit, hold = rewriter.calibration.load_calibration(calib, rewriter.load(model)).split(0.25, 0)
    logits = ort_run(model, {"x": hold.inputs["x"]})[0]
    expected = float(np.mean(np.argmax(logits, axis=1) == hold.labels))
    assert fid["accuracy_before"] == pytest.approx(expected)
    assert fid["outputs"]["logits"]["accuracy_before"] == pytest.approx(expected)
    assert len(data["labels"]) == 24 and fit.n == 18


def test_calib_npy_and_random(model, tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, np.random.default_rng(0).standard_normal((8, 3, 12, 12)).astype(np.float32))
    rj = tmp_path / "npy.json"
    assert cli(model, "--pass", "test-perturb", "--calib", npy, "--report", rj).returncode == 0
    fid = json.loads(rj.read_text())["fidelity"]
    assert fid["samples"] == 2 and fid["synthetic"] is False and "accuracy_before" not in fid
    rr = tmp_path / "random.json"
    proc = cli(model, "--pass", "test-perturb", "--calib", "random", "--report", rr)
    assert proc.returncode == 0
    data = json.loads(rr.read_text())
    assert data["fidelity"]["synthetic"] is True
    assert any("random" in w for w in data["warnings"]) and "random" in proc.stdout


def test_calib_image_folder_with_preprocess(tmp_path):
    from PIL import Image

    model = classifier(tmp_path / "m.onnx", batch=1)  # fixed batch 1, many samples
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / cls / f"{i}.png")
    rj = tmp_path / "r.json"
    proc = cli(model, "--pass", "test-perturb", "--calib", folder, "--preprocess",
               "size=12,mean=0.5,0.5,0.5,std=0.25,0.25,0.25,layout=NCHW,color=rgb", "--report", rj)
    assert proc.returncode == 0, proc.stderr
    fid = json.loads(rj.read_text())["fidelity"]
    assert fid["samples"] == 2 and "accuracy_before" in fid  # labels from class folders
    gray = cli(model, "--pass", "test-perturb", "--calib", folder, "--preprocess", "color=gray")
    assert gray.returncode == 1 and "channels" in one_line_error(gray)


def test_input_shape_and_dims_from_data(tmp_path):
    dyn = tmp_path / "dyn.onnx"
    onnx.save(conv_model(["N", 3, "H", "W"], 4, [3, 3], pads=[1, 1, 1, 1]), str(dyn))
    no_shape = cli(dyn, "--pass", "test-perturb", "--calib", "random")
    assert no_shape.returncode == 1 and "--input-shape" in one_line_error(no_shape)
    rj = tmp_path / "r.json"
    proc = cli(dyn, "--pass", "test-perturb", "--calib", "random", "--input-shape",
               "x:1,3,10,10", "--report", rj)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(rj.read_text())
    assert data["macs_before"] == 10 * 10 * 4 * 3 * 9
    out = onnx.load(str(tmp_path / "dyn.rewritten.onnx"))
    dims = [d.dim_param or d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]  # never frozen in the output
    npz = tmp_path / "c.npz"
    np.savez(npz, x=np.zeros((4, 3, 6, 8), np.float32))
    assert cli(dyn, "--pass", "test-perturb", "--calib", npz, "--report", rj).returncode == 0
    assert json.loads(rj.read_text())["macs_before"] == 6 * 8 * 4 * 3 * 9


# ------------------------------------------------------------------------- bench and gates


def test_bench_threads_and_batches(model, tmp_path):
    rj = tmp_path / "r.json"
    proc = cli(model, "--pass", "test-identity", "--bench", "--threads", "2", "--batch", "1",
               "--batch", "3", "--report", rj)
    assert proc.returncode == 0, proc.stderr
    lat = json.loads(rj.read_text())["latency"]
    assert lat["threads"] == 2 and lat["batch"] == 1
    assert [b["batch"] for b in lat["batches"]] == [1, 3]
    for entry in lat["batches"]:
        assert entry["original_ms"]["median"] > 0 and entry["rewritten_ms"]["p90"] > 0
        assert entry["speedup"]["p10"] <= entry["speedup"]["median"] <= entry["speedup"]["p90"]
    assert "latency (threads 2, batch 1)" in proc.stdout
    assert "\x1b[" not in proc.stdout  # not a terminal: plain output, no progress bars


def test_gates_fail_with_exit_3_and_write_nothing(model, calib, tmp_path):
    out = tmp_path / "out.onnx"
    common = [model, "--pass", "test-perturb:eps=0.05", "--calib", calib, "-o", out]
    failed = cli(*common, "--min-cosine", "0.9999999", "--report", tmp_path / "r.json")
    assert failed.returncode == 3, failed.stderr
    assert not out.exists()
    report = json.loads((tmp_path / "r.json").read_text())
    gate = report["gates"][0]
    assert gate["name"] == "min-cosine" and gate["passed"] is False
    assert gate["value"] == pytest.approx(report["fidelity"]["cosine"])
    assert report["written"] is False
    kept = cli(*common, "--min-cosine", "0.9999999", "--keep-failed")
    assert kept.returncode == 3 and out.exists()
    out.unlink()
    ok = cli(*common, "--min-cosine", "0.99", "--max-drop", "0.5")
    assert ok.returncode == 0 and out.exists(), ok.stdout
    out.unlink()
    x = np.load(calib)["x"]
    exact = tmp_path / "exact.npz"  # labels the original gets 100% right
    np.savez(exact, x=x, labels=np.argmax(ort_run(model, {"x": x})[0], axis=1))
    flipped = [model, "--pass", "test-perturb:eps=-3", "--calib", exact, "-o", out]
    drop = cli(*flipped, "--max-drop", "0.0", "--report", tmp_path / "d.json")
    assert drop.returncode == 3 and not out.exists()  # sign-flipped weights change the classes
    fid = json.loads((tmp_path / "d.json").read_text())["fidelity"]
    assert fid["accuracy_before"] == 1.0 > fid["accuracy_after"]
    no_bench = cli(*common, "--min-speedup", "1.0")  # a usage error at the start, not exit 3
    assert no_bench.returncode == 2 and "needs --bench" in one_line_error(no_bench)
    slow = cli(*common, "--bench", "--min-speedup", "100")
    assert slow.returncode == 3 and not out.exists()


# ------------------------------------------------------------------------- config, plot


def test_config_equals_flags(model, calib, tmp_path):
    by_flags = tmp_path / "flags.onnx"
    assert cli(model, "--pass", "test-perturb:eps=0.02", "--pass", "test-identity", "--calib",
               calib, "-o", by_flags, "--min-cosine", "0.99").returncode == 0
    (tmp_path / "pipe.toml").write_text(
        'output = "cfg.onnx"\n'
        "[[pass]]\nname = \"test-perturb\"\neps = 0.02\n"
        "[[pass]]\nname = \"test-identity\"\n"
        "[calibration]\ndata = \"calib.npz\"\nholdout = 0.25\n"
        "[gates]\nmin_cosine = 0.99\n"
        "[outputs]\nreport = [\"cfg.json\", \"cfg.md\"]\n"
    )
    proc = cli(model, "--config", tmp_path / "pipe.toml", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cfg.onnx").read_bytes() == by_flags.read_bytes()
    data = json.loads((tmp_path / "cfg.json").read_text())
    assert data["options"]["passes"] == ["test-perturb:eps=0.02", "test-identity"]
    assert data["gates"][0]["name"] == "min-cosine" and (tmp_path / "cfg.md").exists()
    # a flag on the command line wins over the file
    strict = cli(model, "--config", tmp_path / "pipe.toml", "--min-cosine", "0.9999999")
    assert strict.returncode == 3
    (tmp_path / "bad.toml").write_text("[gates]\nmin_cosin = 0.9\n")
    bad = cli(model, "--config", tmp_path / "bad.toml")
    assert bad.returncode == 2 and "min_cosin" in one_line_error(bad)
    (tmp_path / "broken.toml").write_text("[gates\n")
    assert cli(model, "--config", tmp_path / "broken.toml").returncode == 2


def test_plot_writes_png(model, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # the plot extra
    import tests.passes_for_tests  # noqa: F401

    png = tmp_path / "p.png"
    proc = cli(model, "--pass", "test-perturb", "--bench", "--plot", png)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were missing
    png2 = tmp_path / "p2.png"
    assert main([str(model), "--pass", "test-perturb", "--plot", str(png2), "-q"]) == 1
    assert not png2.exists()


# ------------------------------------------------------------------------- determinism, API


def test_same_input_and_options_give_identical_bytes(model, calib, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    args = ["--pass", "test-perturb:eps=0.03", "--calib", calib, "--seed", "3"]
    assert cli(model, *args, "-o", a).returncode == 0
    assert cli(model, *args, "-o", b).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    api = tmp_path / "api.onnx"
    result = rewriter.rewrite(rewriter.load(model), ["test-perturb:eps=0.03"], calib=calib, seed=3)
    rewriter.save(result.model, api)
    assert api.read_bytes() == a.read_bytes()


def test_python_api_is_silent_and_returns_result(model, calib, capsys):
    import tests.passes_for_tests  # noqa: F401

    result = rewriter.rewrite(
        model, [("test-perturb", {"eps": 0.02}), {"name": "test-identity"}],
        calib=str(calib), input_shapes={"x": (1, 3, 12, 12)},
    )
    assert capsys.readouterr() == ("", "")
    report = result.report.to_dict()
    assert [p["name"] for p in report["passes"]] == ["test-perturb", "test-identity"]
    assert report["fidelity"]["samples"] == 6 and "accuracy_after" in report["fidelity"]
    from rewriter.bench import benchmark_models
    from rewriter.gates import evaluate_gates

    result.report.latency = benchmark_models(result.original, result.model, {}, threads=1,
                                             batches=[2], data=result.holdout, repeats=5)
    assert result.report.latency["batch"] == 2 and result.report.latency["repeats"] == 5
    gates = evaluate_gates(result.report, max_drop=1.0, min_cosine=0.5, min_speedup=1e6)
    assert [g["passed"] for g in gates] == [True, True, False]
    assert capsys.readouterr() == ("", "")


def test_real_exact_pass_through_installed_script(model, tmp_path):
    name = "cleanup"
    out = tmp_path / "exact.onnx"
    proc = real_cli(model, "--pass", name, "-o", out, "--calib", "random", "--report",
                    tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(model, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_bottleneck_with_gates_through_installed_script(tmp_path):
    model = tmp_path / "wide.onnx"
    onnx.save(conv_model([1, 32, 16, 16], 32, [3, 3], pads=[1, 1, 1, 1]), str(model))
    np.savez(tmp_path / "c.npz",
             x=np.random.default_rng(0).standard_normal((16, 32, 16, 16)).astype(np.float32))
    rj = tmp_path / "r.json"
    proc = real_cli(model, "--pass", "bottleneck:ratio=0.25", "--calib", tmp_path / "c.npz",
                    "--report", rj, "--min-cosine", "0.0")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(rj.read_text())
    assert data["macs_after"] < data["macs_before"]
    assert data["passes"][0]["applied"] == 1


def test_a_lossy_rewrite_without_data_says_its_accuracy_was_not_measured(model):
    """No --calib, no --eval: the model is still written, but never silently as if it held."""
    import tests.passes_for_tests  # noqa: F401

    shapes = {"x": (1, 3, 12, 12)}
    lossy = rewriter.rewrite(model, [("test-perturb", {"eps": 0.02})], input_shapes=shapes)
    assert lossy.report.fidelity is None
    warning = next(w for w in lossy.report.warnings if w.startswith("accuracy not measured"))
    assert "test-perturb" in warning and "--calib" in warning
    moved = float(re.search(r"rel L2 up to ([0-9.e-]+)", warning).group(1))
    assert 0.005 < moved <= 0.02  # weights scaled by 1.02 move the logits by at most 2%
    exact = rewriter.rewrite(model, ["test-identity"], input_shapes=shapes)
    assert not any("accuracy not measured" in w for w in exact.report.warnings)
    measured = rewriter.rewrite(model, [("test-perturb", {"eps": 0.02})], calib="random",
                                input_shapes=shapes)
    assert measured.report.fidelity is not None
    assert not any("accuracy not measured" in w for w in measured.report.warnings)


def test_outputs_ordered_by_score_are_named_as_such(tmp_path):
    """An end-to-end detector ends in TopK/NMS: its positions swap with its scores, which
    per-position fidelity cannot see through; the run says so and points at --metric."""
    import tests.passes_for_tests  # noqa: F401

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "flat"),
             numpy_helper.from_array(np.array([5], np.int64), "k")]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
        helper.make_node("Reshape", ["s", "flat"], ["f"], name="flatten"),
        helper.make_node("TopK", ["f", "k"], ["top", "where"], name="topk"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])
    outs = [helper.make_tensor_value_info("top", TensorProto.FLOAT, [2, 5]),
            helper.make_tensor_value_info("where", TensorProto.INT64, [2, 5])]
    model = tmp_path / "topk.onnx"
    onnx.save(make_model(nodes, [x], outs, inits), str(model))
    result = rewriter.rewrite(model, ["test-identity"], calib="random")
    warnings = [w for w in result.report.warnings if "ordered by score" in w]
    assert [w.split("'")[1] for w in warnings] == ["top", "where"]
    assert "after TopK" in warnings[0] and "--metric" in warnings[0]
    plain = rewriter.rewrite(classifier(tmp_path / "c.onnx"), ["test-identity"], calib="random")
    assert not any("ordered by score" in w for w in plain.report.warnings)


def test_python_api_reads_dynamic_dims_off_the_calibration_data():
    """A model with dynamic H, W gets real MACs from `rewrite(calib=...)`, not only via the CLI."""
    import numpy as np

    from tests.builders import conv_model

    model = rewriter.load(conv_model(["N", 16, "H", "W"], 16, [3, 3], pads=[1, 1, 1, 1]))
    calib = {"x": np.random.default_rng(0).standard_normal((4, 16, 8, 8)).astype(np.float32)}
    result = rewriter.rewrite(model, ["cleanup"], calib=calib)
    assert result.input_shapes == {"x": (1, 16, 8, 8)}
    assert result.report.macs_before >= 8 * 8 * 16 * 16 * 9
    out = model.graph.inputs[0].shape
    assert not isinstance(out[2], int) and not isinstance(out[3], int)  # never frozen


def test_eval_measures_fidelity_on_the_labelled_test_set(tmp_path):
    """--eval DATA: fidelity and accuracy come from that data, not the calibration split."""
    from tests.conftest import TRAINED

    report = tmp_path / "r.json"
    code = main([str(TRAINED / "digits_cnn.onnx"), "--pass", "cleanup", "-q",
                 "--calib", str(TRAINED / "digits_calib.npz"),
                 "--eval", str(TRAINED / "digits_test.npz"),
                 "-o", str(tmp_path / "o.onnx"), "--report", str(report)])
    assert code == 0
    fidelity = json.loads(report.read_text())["fidelity"]
    assert fidelity["samples"] == 540 and fidelity["dataset"].endswith("digits_test.npz")
    assert fidelity["accuracy_before"] == fidelity["accuracy_after"] > 0.98
