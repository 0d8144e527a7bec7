"""Validate everything, then run: usage mistakes exit 2 before any data is read or pass runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import rewriter
from rewriter.cli import main
from rewriter.errors import UsageError
from tests.builders import conv_model


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model([1, 16, 8, 8], 16, [3, 3], pads=[1, 1, 1, 1]), str(path))
    return path


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((8, 16, 8, 8)).astype(np.float32))
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Any attempt to read the model or calibration data, or to run a pass, fails the test."""
    import rewriter.calibration
    import rewriter.io
    import rewriter.pipeline

    def boom(*args, **kwargs):
        raise AssertionError("work started before validation finished")

    monkeypatch.setattr(rewriter.calibration, "load_calibration", boom)
    monkeypatch.setattr(rewriter.pipeline, "load_calibration", boom)
    monkeypatch.setattr(rewriter.io, "load", boom)


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args] + ["-q"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "second, message",
    [
        ("dense-head:hiden=0", "did you mean 'hidden'"),
        ("bottleneck:shrink=nan", "finite"),
        ("bottleneck:ridge=-1", ">= 0"),
        ("bottleneck:min-channels=-5", ">= 0"),
        ("bottleneck:max-positions=0", ">= 1"),
        ("bottlenek", "did you mean 'bottleneck'"),
    ],
)
def test_a_typo_in_the_second_pass_exits_2_before_calibration(
    model, calib, capsys, no_work, second, message
):
    code, err = run(capsys, model, "--pass", "fold-bn", "--pass", second, "--calib", calib)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "-5"], "--seed must be >= 0"),
        (["--holdout", "nan"], "--holdout must be a finite number"),
        (["--holdout", "-1"], "--holdout must be > 0"),
        (["--holdout", "1.5"], "--holdout must be < 1"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--batch", "-1"], "--batch must be >= 1"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--distill", "lr=nan"], "--distill: option 'lr=nan'"),
        (["--distill", "stesp=3"], "did you mean 'steps'"),
        (["--preprocess", "sise=3"], "--preprocess: unknown option 'sise'"),
        (["--input-shape", "x:-1,16,8,8"], "dims must be >= 1"),
        (["--report", "x.txt"], "--report x.txt: unknown suffix"),
        (["--min-speedup", "1.1"], "--min-speedup needs --bench"),
        (["--max-drop", "2"], "--max-drop must be <= 1"),
        (["--min-cosine", "nan"], "finite"),
        (["--plot", "p.jpg"], "PNG"),
    ],
)
def test_usage_mistakes_exit_2_before_any_work(model, calib, capsys, no_work, flags, message):
    code, err = run(capsys, model, "--pass", "cleanup", "--calib", calib, *flags)
    assert code == 2, err
    assert message in err


def test_gate_without_fidelity_data_is_a_usage_error(model, capsys, no_work):
    code, err = run(capsys, model, "--pass", "cleanup", "--min-cosine", "0.9")
    assert code == 2 and "--min-cosine needs fidelity data" in err
    code, err = run(capsys, model, "--pass", "cleanup", "--calib", "random", "--max-drop", "0.1")
    assert code == 2 and "random data proves nothing" in err


def test_config_values_are_checked_the_same_way(model, tmp_path, capsys, no_work):
    bad_type = tmp_path / "t.toml"
    bad_type.write_text('[[pass]]\nname = "cleanup"\n[bench]\nbatch = ["a"]\n')
    code, err = run(capsys, model, "--config", bad_type)
    assert code == 2 and "bench.batch" in err
    bad_option = tmp_path / "o.toml"
    bad_option.write_text('[[pass]]\nname = "bottleneck"\nratio = "half"\n')
    code, err = run(capsys, model, "--config", bad_option)
    assert code == 2 and "ratio" in err
    bad_seed = tmp_path / "s.toml"
    bad_seed.write_text('seed = -5\n[[pass]]\nname = "cleanup"\n')
    code, err = run(capsys, model, "--config", bad_seed)
    assert code == 2 and "--seed must be >= 0" in err


@pytest.mark.parametrize(
    "flags, module, extra",
    [
        (["--distill", "steps=1"], "torch", "onexone[finetune]"),
        (["--plot", "p.png"], "matplotlib", "onexone[plot]"),
    ],
)
def test_missing_extra_is_one_line_before_any_work(
    model, calib, capsys, monkeypatch, no_work, flags, module, extra
):
    import rewriter.extras

    real = rewriter.extras.installed
    monkeypatch.setattr(rewriter.extras, "installed", lambda name: name != module and real(name))
    code, err = run(capsys, model, "--pass", "cleanup", "--calib", calib, *flags)
    assert code == 1, err
    assert f"pip install '{extra}'" in err and len(err.strip().splitlines()) == 1


def test_image_folder_without_a_decoder_names_the_images_extra(
    model, tmp_path, capsys, monkeypatch, no_work
):
    import rewriter.extras

    monkeypatch.setattr(rewriter.extras, "installed", lambda name: False)
    (tmp_path / "imgs").mkdir()
    code, err = run(capsys, model, "--pass", "cleanup", "--calib", tmp_path / "imgs")
    assert code == 1 and "pip install 'onexone[images]'" in err


def test_python_api_checks_before_loading_calibration_and_speaks_api_terms(model, no_work):
    m = onnx.load(str(model))
    with pytest.raises(UsageError, match="did you mean 'hidden'") as exc:
        rewriter.rewrite(_ir(m),
                         ["fold-bn", "dense-head:hiden=0"], calib="c.npz")
    assert "--" not in str(exc.value)
    with pytest.raises(UsageError, match=r"^holdout must be < 1"):
        rewriter.rewrite(_ir(m), ["cleanup"], calib="c.npz", holdout=1.5)
    with pytest.raises(UsageError, match=r"^seed must be >= 0"):
        rewriter.rewrite(_ir(m), ["cleanup"], calib="c.npz", seed=-1)
    with pytest.raises(UsageError, match=r"^distill: option 'lr=nan'"):
        rewriter.rewrite(_ir(m), ["cleanup"], calib="c.npz", distill="lr=nan")


def _ir(proto):
    import onnx_ir as ir

    return ir.serde.deserialize_model(proto)
