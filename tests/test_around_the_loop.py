"""Around the loop: progress output, run folders, pictures, error analysis, comparison, multi-process."""
import contextlib
import csv
import io
import json
import os
import struct
import subprocess
import sys

import pytest

import main
from engine import recipes
from engine import folders
from engine import runtime
from conftest import ROOT, base_args


def png_size(path):
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """python main.py --model three --demo, as a new user runs it in a fresh folder (the demo set built in the
    run), its output not a terminal; (folder it ran in, its run folder, stdout). The tests of what a run
    writes read this run: one training run serves them all (the slowest step of the suite on a CPU)."""
    tmp = tmp_path_factory.mktemp("demo")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
            rc = main.main(["--model", "three", "--demo"])
    finally:
        os.chdir(cwd)
    assert rc == 0, err.getvalue()
    (run,) = (tmp / "runs").iterdir()
    return tmp, run, out.getvalue()


@pytest.fixture(scope="module")
def run(demo):
    """(folder the demo ran in, its run folder)."""
    return demo[:2]


def test_the_readmes_first_command_trains_the_demo_to_85_percent_with_class_4_hardest(demo):
    """Per-epoch lines, the report with its confusion matrix, a submission and the pictures; >= 85% with class 4
    the hardest."""
    tmp, run, out = demo
    assert "building the synthetic demo data set" in out and out.count("epoch ") >= 3 and "Confusion matrix" in out
    rep = json.load(open(run / "report.json"))
    recall = {c: m["recall"] for c, m in rep["classes"].items()}
    assert rep["accuracy"] >= 0.85 and min(recall, key=recall.get) == "4", recall
    assert all((run / f).exists() for f in ("submission.csv", "confusion.png", "curves.png"))
    assert (tmp / "models_pth" / "demo" / "three_best.pth").exists()


def test_plain_output_is_one_line_per_epoch(demo):
    out = demo[2]
    epoch_lines = [l for l in out.splitlines() if l.startswith("epoch ")]
    assert len(epoch_lines) == recipes.DEMO_EPOCHS and "\r" not in out
    assert "lr " in epoch_lines[0] and "val loss" in epoch_lines[0] and "train loss" in epoch_lines[0]


def test_progress_bars_on_a_terminal_only(monkeypatch):
    cfg = dict(recipes.DEFAULTS)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert not runtime.progress(10, "x", cfg).disable
    assert runtime.progress(10, "x", {**cfg, "quiet": True}).disable
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert runtime.progress(10, "x", cfg).disable


def test_run_folder_holds_config_log_report_submission_and_pictures(run):
    _, folder = run
    cfg = json.load(open(folder / "config.json"))
    assert cfg["model"] == "three" and cfg["batch_size"] == 16 and cfg["lr"] == 5e-4 and "device_name" in cfg
    rows = list(csv.DictReader(open(folder / "log.csv")))
    assert list(rows[0]) == folders.LOG_FIELDS and len(rows) == recipes.DEMO_EPOCHS
    rep = json.load(open(folder / "report.json"))
    assert set(rep["classes"]) == {"0", "1", "2", "3", "4"} and {"precision", "recall", "f1-score"} <= set(rep["classes"]["4"])
    for name, min_size in [("confusion.png", (400, 200)), ("curves.png", (600, 150))]:
        w, h = png_size(folder / name)
        assert w >= min_size[0] and h >= min_size[1] and w < 3000 and h < 3000


def test_report_json_agrees_with_the_printed_report(run):
    _, folder = run
    rep = json.load(open(folder / "report.json"))
    text = open(folder / "report.txt").read()
    assert f"Validation accuracy: {rep['accuracy'] * 100:.2f}%" in text
    for a, row in enumerate(rep["confusion_matrix"]):
        assert f"| {a}        |" + "|".join(f"{v:>4} " for v in row) + "|" in text


def test_analyze_writes_confusions_and_galleries(run, tiny_data, run_main):
    tmp, folder = run
    rc, out, _ = run_main(["--analyze", folder / "best.pth", "--data-dir", tiny_data, "--out-dir", tmp / "a",
                           "--cache-dir", tmp / "cache", "--quiet"])
    assert rc == 0 and "Most confused pairs" in out
    d = next((tmp / "a").glob("analyze-three-*"))
    text = open(d / "analysis.txt").read()
    rep = json.load(open(d / "report.json"))
    for m in rep["most_confused"]:
        assert f"{m['actual']} -> {m['predicted']}: {m['count']}" in text
    assert png_size(d / "worst.png")[0] > 300 and png_size(d / "samples.png")[0] > 300


def test_compare_lists_finished_runs(run, run_main):
    tmp, folder = run
    rc, out, _ = run_main(["--compare", folder])
    rep = json.load(open(folder / "report.json"))
    line = next(l for l in out.splitlines() if l.startswith(folder.name + " "))
    assert rc == 0 and "three" in line and f"{rep['accuracy'] * 100:.2f}%" in line
    assert f"{rep['classes']['4']['recall']:.3f}" in line and f" {recipes.DEMO_EPOCHS} " in line
    rc, out, _ = run_main(["--compare", "--out-dir", tmp / "runs"])
    assert rc == 0 and folder.name + " " in out
    rc, _, err = run_main(["--compare", folder, tmp / "typo"])  # a mistyped folder: one line, not an empty table
    assert rc == 2 and err.strip().splitlines() == [f"error: --compare: {tmp / 'typo'} is not a folder: pass run "
                                                    f"folders (such as runs/three-...) or none for every run under "
                                                    f"--out-dir"]


def test_torchrun_two_processes_matches_one_process(tiny_data, tmp_path, run_main):
    """DDP with gloo on the CPU: each process trains on half of every batch, gradients are averaged, so
    the run follows the single-process one; BatchNorm sees half batches and dropout draws differ, so
    the match is approximate: train loss within 15% and the same epoch count (that the gradients are averaged
    is the next test's)."""
    args = [str(a) for a in base_args(tiny_data, tmp_path, "--epochs", "2", "--amp", "off", "--device", "cpu")]
    rc, _, err = run_main([*args, "--run-name", "one"])
    assert rc == 0, err
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "main.py", *args, "--run-name", "two"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("epoch   1/2") == 1  # only rank 0 prints
    cfg = json.load(open(tmp_path / "runs" / "two" / "config.json"))
    assert cfg["world_size"] == 2
    la, lb = (list(csv.DictReader(open(tmp_path / "runs" / n / "log.csv"))) for n in ("one", "two"))
    assert len(la) == len(lb) == 2
    for ra, rb in zip(la, lb):
        assert abs(float(ra["train_loss"]) - float(rb["train_loss"])) / float(ra["train_loss"]) < 0.15
    rep = json.load(open(tmp_path / "runs" / "two" / "report.json"))
    assert rep["n"] == 20  # the final report covers the whole validation set
    sub = (tmp_path / "runs" / "two" / "submission.csv").read_text().splitlines()
    assert len(sub) == 11


def _ddp_step(rank, port, out):
    """One process of two: the step main.py takes under torchrun (state.build with DDP), on its half of
    a batch, written to `out` as the weights it ends with."""
    import torch
    import torch.distributed as dist
    from engine import state as run_state, trainstep
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    cfg = {**recipes.resolve_config(main.parse_args(["--model", "three"]))[0], "lr": 0.1}
    state = run_state.build(cfg, model, torch.device("cpu"), None, False, 10, compile=False, ddp=True)
    x, y = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 5
    trainstep.step(state, x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4])
    torch.save(model.state_dict(), f"{out}.{rank}")
    dist.destroy_process_group()


def test_under_torchrun_each_step_averages_the_processes_gradients(tmp_path):
    """Two processes, half a batch each, take the step one process takes on the whole batch: the same weights in
    both (within rounding), which neither would reach on its own half (the model has no BatchNorm or dropout)."""
    import socket
    import torch
    import torch.multiprocessing as mp
    from engine import state as run_state, trainstep
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_step, args=(port, str(tmp_path / "w")), nprocs=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    cfg = {**recipes.resolve_config(main.parse_args(["--model", "three"]))[0], "lr": 0.1}
    start = {k: v.clone() for k, v in model.state_dict().items()}
    state = run_state.build(cfg, model, torch.device("cpu"), None, False, 10, compile=False, ddp=False)
    x, y = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 5
    trainstep.step(state, x, y)
    ranks = [torch.load(tmp_path / f"w.{r}", weights_only=True) for r in (0, 1)]
    for k, v in model.state_dict().items():
        assert not torch.allclose(v, start[k]), k  # the step moved it
        assert torch.allclose(ranks[0][k], v, atol=1e-6) and torch.allclose(ranks[1][k], v, atol=1e-6), k


def test_a_picture_that_cannot_be_drawn_costs_no_submission(tiny_data, tmp_path, run_main, monkeypatch):
    from engine import report

    def broken(*args):
        raise RuntimeError("no usable backend")
    monkeypatch.setattr(report, "plot_confusion", broken)
    monkeypatch.setattr(report, "plot_curves", broken)
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--epochs", "1"))
    run = tmp_path / "runs" / "r"
    assert rc == 0, err
    assert f"note: could not draw {run / 'confusion.png'} (RuntimeError: no usable backend)" in out
    assert f"note: could not draw {run / 'curves.png'}" in out
    assert (run / "submission.csv").exists() and (run / "report.txt").exists()
    assert (tmp_path / "ckpt" / "three_best.pth").exists()


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_under_torchrun_the_first_process_of_a_machine_decodes_while_the_others_wait(local_rank, monkeypatch):
    """The others then read its decode cache (the two-process run above goes through this for real)."""
    events = []
    monkeypatch.setattr(runtime, "WORLD", 2)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(runtime.dist, "barrier", lambda: events.append("barrier"))
    assert runtime.first_on_each_machine(lambda: events.append("decode") or "loaders") == "loaders"
    assert events == (["decode", "barrier"] if local_rank == "0" else ["barrier", "decode"])
