"""Shared fixtures: the tiny synthetic data set, the quick-run flags, main.main in-process and as a process."""
import os
import subprocess
import sys

import pytest

import main
from engine import demo_data, folders, promote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A Python started by a test (python -c SCRIPT) imports the project as pytest does: from the root
WITH_ROOT = {**os.environ, "PYTHONPATH": ROOT}

TINY = {"train": 16, "validation": 20, "test": 10}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny Kaggle-layout data set (synthetic), built once for the whole session."""
    return demo_data.build(str(tmp_path_factory.mktemp("tiny")), TINY, seed=1)


@pytest.fixture
def copy_data(tiny_data, tmp_path):
    """A private copy of the tiny set, for tests that damage it."""
    import shutil
    dest = tmp_path / "data"
    shutil.copytree(tiny_data, dest, ignore=shutil.ignore_patterns(".cache"))
    return str(dest)


def base_args(data, tmp_path, *extra):
    """Flags for a quick run on tiny data with every output inside tmp_path."""
    return ["--model", "three", "--data-dir", str(data), "--out-dir", str(tmp_path / "runs"),
            "--ckpt-dir", str(tmp_path / "ckpt"), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "8",
            "--epochs", "2", "--quiet", "--run-name", "r", *extra]


@pytest.fixture
def fixed_clock(monkeypatch):
    """main.py's clock stopped at 2026-01-02 03:04:05: things made within one second."""
    import datetime
    import types
    stopped = types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda: datetime.datetime(2026, 1, 2, 3, 4, 5)))
    for module in (folders, promote):  # names of run folders, names of earlier bests kept aside
        monkeypatch.setattr(module, "datetime", stopped)


@pytest.fixture
def run_main(capsys):
    """Run main.main(argv) in this process; returns (exit code, stdout, stderr)."""
    def run(argv):
        rc = main.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def stop_at_loss(monkeypatch, n):
    """The run asked to stop (as by SIGTERM) at its n-th loss, inside its n-th step; monkeypatch.undo() ends it."""
    import signal
    from engine import loss, train
    make_loss, calls = loss.make_loss, [0]

    def make_stopping_loss(cfg, weights=None):
        inner = make_loss(cfg, weights)

        def stop_then_loss(out, target):
            calls[0] += 1
            if calls[0] == n:
                train.Stop.signal = signal.SIGTERM
            return inner(out, target)
        return stop_then_loss
    monkeypatch.setattr(loss, "make_loss", make_stopping_loss)


def run_cli(argv, **kw):
    """Run `python main.py ...` in a subprocess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *map(str, argv)], capture_output=True,
                          text=True, cwd=kw.pop("cwd", ROOT), **kw)
