"""Kills, signals and concurrent writers never leave a broken model+data pair or stale temps.

The model and its hash-named data file replace as one unit: data renamed in under a new name,
then the model (the atomic switch), then old data removed. A fault hook kills the writer
between the two renames; the old pair must still load and give the old outputs, and the next
write must clean up what the killed one left. Two writers on one path are serialised by a lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import onnx
import pytest

import rewriter
from rewriter import atomic
from tests.builders import conv_model
from tests.conftest import ROOT, ort_run
from tests.harden_helpers import data_files, hashed_data_files

FEEDS = {"x": np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)}


def _source(folder, seed: int):
    """A model with external data whose weights depend on `seed` (so outputs tell runs apart)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "src.onnx"
    onnx.save(conv_model(["n", 4, 8, 8], 8, [3, 3], pads=[1] * 4, seed=seed), path,
              save_as_external_data=True, location="src.onnx.data", size_threshold=0)
    return path


def _outputs(path):
    return ort_run(path, FEEDS)[0]


_SAVE = "import sys, rewriter; rewriter.save(rewriter.load(sys.argv[1]), sys.argv[2])"


def _save_in_subprocess(src, out, **env):
    return subprocess.run([sys.executable, "-c", _SAVE, str(src), str(out)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, **env})


def _temps(folder):
    return [p for p in folder.iterdir() if p.name.startswith(atomic.TEMP_PREFIX)]


@pytest.mark.parametrize("stage", ["data-renamed", "model-renamed"])
def test_kill_between_renames_keeps_a_whole_pair(tmp_path, stage):
    out_dir = tmp_path / "out"
    out = out_dir / "m.onnx"
    first, second = _source(tmp_path / "a", 1), _source(tmp_path / "b", 2)
    rewriter.save(rewriter.load(first), out)
    want_first, want_second = _outputs(first), _outputs(second)

    killed = _save_in_subprocess(second, out, ONEXONE_FAULT=stage)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    onnx.checker.check_model(str(out), full_check=True)
    expected = want_first if stage == "data-renamed" else want_second
    np.testing.assert_array_equal(_outputs(out), expected)  # never old model + new data
    assert _temps(out_dir), "the kill should have left the writer's temp folder"

    rewriter.save(rewriter.load(second), out)  # the next writer cleans up after the dead one
    np.testing.assert_array_equal(_outputs(out), want_second)
    assert _temps(out_dir) == []
    assert hashed_data_files(out_dir, "m.onnx") == data_files(out)  # no orphan data left


def test_fault_hook_in_process_leaves_the_old_pair(tmp_path, monkeypatch):
    out = tmp_path / "out" / "m.onnx"
    first, second = _source(tmp_path / "a", 1), _source(tmp_path / "b", 2)
    rewriter.save(rewriter.load(first), out)

    def crash(stage):
        if stage == "data-renamed":
            raise RuntimeError("simulated crash between the renames")

    monkeypatch.setattr(atomic, "fault_hook", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        rewriter.save(rewriter.load(second), out)
    np.testing.assert_array_equal(_outputs(out), _outputs(first))
    assert _temps(out.parent) == []  # an exception (unlike a kill) cleans its own temp


def test_two_writers_on_one_path(tmp_path, monkeypatch):
    """Each commit holds the lock; a writer paused between its renames cannot be overtaken, and
    after every commit (checked inside the lock, before the next writer may start) the output
    is a whole pair of one writer's model and data."""
    out = tmp_path / "out" / "m.onnx"
    sources = [_source(tmp_path / f"s{i}", i) for i in range(2)]
    expected = [_outputs(s) for s in sources]
    models = [rewriter.load(s) for s in sources]
    errors, seen = [], []

    def hook(stage):
        if stage == "data-renamed":
            time.sleep(0.05)  # widen the gap another writer would have used
        elif stage == "committed":
            seen.append(_outputs(out))
            assert hashed_data_files(out.parent, "m.onnx") == data_files(out)

    monkeypatch.setattr(atomic, "fault_hook", hook)

    def writer(i):
        try:
            for _ in range(4):
                rewriter.save(models[i], out)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(seen) == 8
    assert all(any(np.array_equal(s, e) for e in expected) for s in seen)
    assert any(np.array_equal(_outputs(out), e) for e in expected)


def test_lock_serialises_commits(tmp_path):
    """While one process holds the output's lock, another's commit waits for it."""
    out = tmp_path / "m.onnx"
    model = rewriter.load(conv_model([1, 4, 8, 8], 8, [3, 3]))
    done = threading.Event()
    with atomic.output_lock(out):
        writer = threading.Thread(target=lambda: (rewriter.save(model, out), done.set()))
        writer.start()
        assert not done.wait(3.0)  # blocked on the lock (staging finished well before)
        assert not out.exists()
    writer.join(60)
    assert done.is_set() and out.exists()


def test_stale_temps_of_dead_owners_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".onexone-{dead}-abc"
    stale.mkdir()
    (stale / "m.onnx").write_bytes(b"partial")
    stale_file = tmp_path / f".onexone-{dead}-x.tmp"
    stale_file.write_bytes(b"partial")
    live = tmp_path / f".onexone-{os.getpid()}-keep"
    live.mkdir()
    unrelated = tmp_path / ".onexone-notapid"
    unrelated.mkdir()
    rewriter.save(rewriter.load(conv_model([1, 4, 8, 8], 8, [3, 3])), tmp_path / "m.onnx")
    assert not stale.exists() and not stale_file.exists()
    assert live.exists() and unrelated.exists()


def test_sigterm_interrupts_a_run_and_cleans_up(tmp_path):
    """SIGTERM during a long onnxruntime run: stopped within seconds, exit 1, nothing left."""
    from tests.test_limits import loop_model

    path = loop_model(tmp_path / "loop.onnx", computed_trips=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    marker = tmp_path / "running"
    script = (
        "import sys, rewriter.limits as limits\n"
        "real = limits.timed_run\n"
        "def marked(*args):\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    return real(*args)\n"
        "limits.timed_run = marked\n"
        "from rewriter.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path), "--pass", "fold-bn",
                             "-o", str(out_dir / "o.onnx")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # inside the endless run now
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1, stderr
    assert "interrupted; nothing written" in stderr and "Traceback" not in stderr
    assert list(out_dir.iterdir()) == []
