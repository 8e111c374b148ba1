"""Runs that survive: resume, determinism, atomic writes, safe loading, interrupts, NaN, resources."""
import csv
import os
import signal
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from engine import checkpoint
import dataloader
import dataset
from engine import demo_data
from engine import inference
import main
import models
from engine import recipes
from engine import report
from engine import folders
from engine import runtime
from conftest import ROOT, WITH_ROOT, base_args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Enough training images for an epoch to last long enough to be interrupted in the middle."""
    return demo_data.build(str(tmp_path_factory.mktemp("long")), {"train": 50, "validation": 20, "test": 10}, seed=2)


# Runs compared bit for bit are given their precision and layout, not timed: on a busy machine --amp auto may
# choose otherwise in each run.
ONE_PRECISION = ("--amp", "off", "--no-channels-last")


def args_for(data, tmp, *extra):
    return base_args(data, tmp, "--epochs", "3", "--batch-size", "2", "--deterministic", "--seed", "5",
                     *ONE_PRECISION, "--cache-dir", tmp.parent / "cache", *extra)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The same run, never interrupted (in this process: which process trains it makes no difference)."""
    tmp = tmp_path_factory.mktemp("ref") / "x"
    assert main.main([str(a) for a in args_for(data, tmp)]) == 0
    return tmp / "runs" / "r"


def epoch_of(path):
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except Exception:
        return -1


def logged_epochs(path):
    try:
        return len(path.read_text().splitlines()) - 1  # the header, then one row per finished epoch
    except OSError:
        return 0


def start_and_wait_for_epochs(argv, run, n):
    """Starts `python main.py ARGV` and returns early in the epoch after epoch N. An epoch's row in log.csv is
    written after its checkpoint and just before the run looks for a stop signal, so a signal sent soon after
    lands in the next epoch (25 steps; on a GPU they take ~0.1 s, so no fixed sleep is safe: polling is)."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *map(str, argv)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while logged_epochs(run / "log.csv") < n:
        assert p.poll() is None and time.time() < deadline, f"run ended before epoch {n} was logged"
        time.sleep(0.01)
    time.sleep(0.02)
    return p


def assert_same_run(a, b):
    ca, cb = (torch.load(d / "last.pth", weights_only=True) for d in (a, b))
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert ca["best_acc"] == cb["best_acc"] and ca["epoch"] == cb["epoch"] == 3 and ca["finished"] and cb["finished"]
    la, lb = (list(csv.DictReader(open(d / "log.csv"))) for d in (a, b))
    assert [int(r["epoch"]) for r in lb] == [1, 2, 3]  # the log continued, no epoch twice
    for ra, rb in zip(la, lb):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
    assert (a / "submission.csv").read_text() == (b / "submission.csv").read_text()


def test_a_double_ctrl_c_then_a_sigkill_keep_the_last_checkpoint_and_the_run_resumes_bit_exact(data, reference,
                                                                                                 tmp_path, run_main):
    """A second Ctrl-C exits at once (130) without waiting for a save; a SIGKILL (the out-of-memory killer, a
    power cut) cannot be caught at all. Each leaves the last checkpoint intact, and the resumes go on from it."""
    run = tmp_path / "runs" / "r"
    p = start_and_wait_for_epochs(args_for(data, tmp_path), run, 1)
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)
    assert p.returncode == 130
    assert epoch_of(run / "last.pth") >= 1  # intact and loadable
    p = start_and_wait_for_epochs(args_for(data, tmp_path, "--resume", run), run, 2)
    p.kill()
    assert p.wait() == -signal.SIGKILL
    assert epoch_of(run / "last.pth") == 2
    rc, out, err = run_main(args_for(data, tmp_path, "--resume", run))
    assert rc == 0, err
    assert "resuming" in out
    assert_same_run(reference, run)


def test_ctrl_c_and_sigterm_save_mid_epoch_and_the_run_resumes_exactly(data, reference, tmp_path, run_main):
    """Ctrl-C early in epoch 2; the resume, in a new process, gets a SIGTERM (what a cluster or tools/sweep.py sends)
    early in epoch 3; the last resume has only the saved configuration. Each stop saved the run inside its
    epoch, and the whole equals the run that was never stopped."""
    run = tmp_path / "runs" / "r"
    for argv, sig, code, done in [(args_for(data, tmp_path), signal.SIGINT, 130, 1),
                                  (["--resume", run, "--quiet"], signal.SIGTERM, 143, 2)]:
        p = start_and_wait_for_epochs(argv, run, done)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        assert p.returncode == code, err
        assert f"python main.py --resume {run}" in out
        ck = torch.load(run / "last.pth", weights_only=True)
        assert ck["epoch"] == done and 0 < ck["step"] < 25, sig  # stopped inside the epoch (25 steps), after a step
    rc, out, err = run_main(["--resume", run, "--quiet"])  # the saved configuration is enough to continue
    assert rc == 0, err
    assert "step" in out
    assert_same_run(reference, run)


def test_same_seed_same_run_different_seed_different_run(tiny_data, tmp_path, run_main):
    sd = []
    for k, seed in enumerate([1, 1, 2]):
        rc, _, _ = run_main(base_args(tiny_data, tmp_path / str(k), "--epochs", "1", "--seed", seed, "--deterministic",
                                      *ONE_PRECISION))
        assert rc == 0
        sd.append(torch.load(tmp_path / str(k) / "runs" / "r" / "last.pth", weights_only=True)["state_dict"])
    w = "features.0.weight"
    assert torch.equal(sd[0][w], sd[1][w]) and not torch.equal(sd[0][w], sd[2][w])


def test_a_finished_run_goes_on_with_a_larger_epochs_as_if_it_had_been_one_run(tiny_data, tmp_path, run_main):
    flags = ("--deterministic", "--seed", "3", *ONE_PRECISION)
    assert run_main(base_args(tiny_data, tmp_path / "one", "--epochs", "2", *flags))[0] == 0
    assert run_main(base_args(tiny_data, tmp_path / "two", "--epochs", "1", *flags))[0] == 0
    last = tmp_path / "two" / "runs" / "r" / "last.pth"
    before = last.read_bytes()
    rc, out, _ = run_main(["--resume", last])  # no room: says so, names the flag, changes nothing
    assert rc == 0 and "already finished" in out and "nothing to do" in out and "a larger --epochs" in out
    assert last.read_bytes() == before
    rc, out, err = run_main(["--resume", last, "--epochs", "2"])
    assert rc == 0 and "training it further" in out, err
    a, b = (torch.load(p, weights_only=True) for p in (tmp_path / "one" / "runs" / "r" / "last.pth", last))
    assert b["epoch"] == 2 and b["finished"] and b["config"]["epochs"] == 2
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    logs = [list(csv.DictReader(open(p / "runs" / "r" / "log.csv"))) for p in (tmp_path / "one", tmp_path / "two")]
    assert [r["val_acc"] for r in logs[0]] == [r["val_acc"] for r in logs[1]] and len(logs[1]) == 2


def test_a_run_stopped_before_its_submission_writes_it_when_resumed(tiny_data, tmp_path, run_main, monkeypatch):
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "write_submission", ctrl_c)  # Ctrl-C after the last epoch, before the submission
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "1"))[0] == 130
    run = tmp_path / "runs" / "r"
    assert torch.load(run / "last.pth", weights_only=True)["finished"] and not (run / "submission.csv").exists()
    monkeypatch.undo()
    rc, out, err = run_main(["--resume", run])
    assert rc == 0 and "writing them" in out, err
    assert len((run / "submission.csv").read_text().splitlines()) == 11 and (tmp_path / "ckpt" / "three_best.pth").exists()
    assert "nothing to do" in run_main(["--resume", run])[1]


def test_a_run_stopped_early_goes_on_with_a_larger_early_stop(tiny_data, tmp_path, run_main, monkeypatch):
    monkeypatch.setattr(inference, "evaluate_split", lambda *a, **k: (1.0, 0.5, [0.5] * 5))  # never a gain
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "2", "--early-stop", "1"))[0] == 0
    last = tmp_path / "runs" / "r" / "last.pth"
    ck = torch.load(last, weights_only=True)
    assert ck["finished"] and ck["epoch"] == 2 and ck["bad_epochs"] == 1  # no gain in epoch 2: stopped early
    rc, out, _ = run_main(["--resume", last, "--epochs", "4"])
    assert rc == 0 and "nothing to do" in out and "a larger --early-stop" in out
    assert run_main(["--resume", last, "--epochs", "4", "--early-stop", "5"])[0] == 0
    assert torch.load(last, weights_only=True)["epoch"] == 4


def test_a_cosine_run_resumed_with_more_epochs_follows_the_longer_cosine(tiny_data, tmp_path, run_main):
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "1", "--scheduler", "cosine", "--lr", "1e-3"))[0] == 0
    last = tmp_path / "runs" / "r" / "last.pth"  # finished: its cosine came down to zero
    assert run_main(["--resume", last, "--epochs", "3"])[0] == 0
    lrs = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "runs" / "r" / "log.csv"))]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 2.5e-4])  # epochs 2 and 3 of a 3-epoch cosine: (1 + cos(pi t/3)) / 2
    assert torch.load(last, weights_only=True)["optimizer"]["param_groups"][0]["lr"] < 1e-12  # and it ends at zero


def test_resume_refuses_data_that_changed_under_the_run(copy_data, tmp_path, run_main):
    assert run_main(base_args(copy_data, tmp_path, "--epochs", "1"))[0] == 0
    last = tmp_path / "runs" / "r" / "last.pth"
    before = last.read_bytes()
    train_csv, val_csv = Path(copy_data, "train.csv"), Path(copy_data, "validation.csv")
    train_rows, val_rows = train_csv.read_text(), val_csv.read_text()
    train_csv.write_text("".join(train_rows.splitlines(keepends=True)[:-5]))  # 5 rows fewer
    resume = ["--resume", last, "--epochs", "2"]
    rc, _, err = run_main(resume)
    assert rc == 2 and err.strip().splitlines() == [
        f"error: cannot resume {last}: {train_csv} has changed since the run started (11 rows, it had 16): "
        f"restore it, or start a new run"]
    ck = torch.load(last, weights_only=True)
    del ck["data"]  # a checkpoint from before the digests: its saved plan still tells the rows apart
    checkpoint.save(ck, str(last))
    assert "(11 rows, it had 16)" in run_main(resume)[2]
    train_csv.write_text(train_rows)
    assert run_main(resume)[0] == 0  # the same rows again: it resumes
    image_id, label = val_rows.splitlines()[1].split(",")
    val_csv.write_text(val_rows.replace(f"{image_id},{label}\n", f"{image_id},{(int(label) + 1) % 5}\n"))  # relabelled
    rc, _, err = run_main(["--resume", last, "--epochs", "3"])
    assert rc == 2 and "validation.csv has changed" in err
    assert before != last.read_bytes() and torch.load(last, weights_only=True)["epoch"] == 2


def test_resume_keeps_the_runs_own_settings(tiny_data, tmp_path, run_main, monkeypatch):
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "1", "--amp", "off", "--lr", "2e-4"))[0] == 0
    last = tmp_path / "runs" / "r" / "last.pth"
    ck = torch.load(last, weights_only=True)
    ck["finished"], ck["config"]["epochs"] = False, 2  # as if it had been stopped with an epoch to go
    checkpoint.save(ck, str(last))
    seen = []
    real = runtime.amp_dtype
    monkeypatch.setattr(runtime, "amp_dtype", lambda cfg, dev: seen.append(cfg["amp"]) or real(cfg, dev))
    rc, out, _ = run_main(["--resume", last, "--quiet"])
    assert rc == 0 and seen[0] == "off"
    assert torch.load(last, weights_only=True)["config"]["lr"] == 2e-4


def test_demo_resume_keeps_the_runs_epochs():
    # --demo means DEMO_EPOCHS (3) for a new run; a resumed demo run keeps the --epochs it was started with
    fresh, given = recipes.resolve_config(main.parse_args(["--demo"]))
    assert fresh["epochs"] == recipes.DEMO_EPOCHS and given["epochs"] == recipes.DEMO_EPOCHS
    _, given = recipes.resolve_config(main.parse_args(["--demo", "--resume"]))
    assert "epochs" not in given and given["data_dir"] == recipes.DEMO_DIR
    _, given = recipes.resolve_config(main.parse_args(["--demo", "--resume", "--epochs", "12"]))
    assert given["epochs"] == 12


def test_a_run_with_relative_paths_resumes_from_another_working_directory(tiny_data, tmp_path, run_main,
                                                                           monkeypatch):
    monkeypatch.chdir(os.path.dirname(tiny_data))
    args = base_args(os.path.basename(tiny_data), tmp_path, "--epochs", "1", "--amp", "off")
    args[args.index("--out-dir") + 1] = "runs-rel"  # relative too
    assert run_main(args)[0] == 0
    last = Path(tiny_data).parent / "runs-rel" / "r" / "last.pth"
    ck = torch.load(last, weights_only=True)
    assert ck["config"]["data_dir"] == tiny_data and os.path.isabs(ck["config"]["out_dir"])
    ck["finished"], ck["config"]["epochs"] = False, 2  # as if it had been stopped with an epoch to go
    checkpoint.save(ck, str(last))
    monkeypatch.chdir(tmp_path)  # elsewhere: 'tiny...' and 'runs-rel' mean nothing here
    rc, out, err = run_main(["--resume", str(last), "--quiet"])
    assert rc == 0, err
    assert torch.load(last, weights_only=True)["epoch"] == 2
    # the same data folder given relatively again (from its parent) is not "another setting"
    monkeypatch.chdir(os.path.dirname(tiny_data))
    ck = torch.load(last, weights_only=True)
    ck["finished"], ck["config"]["epochs"] = False, 3
    checkpoint.save(ck, str(last))
    assert run_main(["--resume", str(last), "--quiet", "--data-dir", os.path.basename(tiny_data)])[0] == 0


def test_resume_of_a_folder_of_runs_names_the_latest_run_in_it(tiny_data, tmp_path, run_main):
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "1"))[0] == 0
    rc, _, err = run_main(["--resume", tmp_path / "runs"])
    assert rc == 2 and err.strip().splitlines() == [
        f"error: --resume {tmp_path / 'runs'}: not a run folder (no last.pth); the latest run in it is "
        f"{tmp_path / 'runs' / 'r'}: pass that one"]


def test_resume_refuses_a_checkpoint_without_training_state(tmp_path, run_main):
    path = tmp_path / "weights.pth"
    checkpoint.save({"model": "three", "state_dict": models.ThreeCNN().state_dict(), "config": {}}, str(path))
    rc, _, err = run_main(["--resume", path])
    assert rc == 2 and "no training state" in err and str(path) in err


def test_resume_refuses_another_model_or_other_settings(reference, run_main):
    rc, _, err = run_main(["--resume", reference, "--lr", "0.1"])
    assert rc == 2 and "cannot resume" in err and "--lr 0.1" in err
    rc, _, err = run_main(["--resume", reference, "--model", "skip"])
    assert rc == 2 and "holds a 'three' model, not 'skip'" in err


# ---------------------------------------------------------------------------------------------- files

SAVER = """
import torch
from engine import checkpoint
i = 0
while True:
    i += 1
    checkpoint.save({{"model": "three", "state_dict": {{"w": torch.full((1_000_000,), float(i))}}, "i": i}}, {path!r})
    if i == 1:
        print("saved", flush=True)
"""


def test_a_kill_during_saves_leaves_the_old_or_the_new_file(tmp_path):
    def kill_one_writer(k):  # five writers at once, each killed at another point of the writes after its first
        path = str(tmp_path / f"c{k}.pth")
        p = subprocess.Popen([sys.executable, "-c", SAVER.format(path=path)], stdout=subprocess.PIPE,
                             text=True, env=WITH_ROOT)
        assert p.stdout.readline().strip() == "saved"
        time.sleep(0.05 + 0.06 * k)
        p.kill()
        p.wait()
        ck = checkpoint.load(path)  # never torn: loads, and is one consistent version
        assert torch.all(ck["state_dict"]["w"] == ck["i"])
        return ck["i"]
    with ThreadPoolExecutor(5) as pool:
        seen = set(pool.map(kill_one_writer, range(5)))
    assert len(seen) > 1


def test_temporaries_left_by_a_killed_writer_are_cleaned_up_by_the_next_save(tmp_path):
    path = tmp_path / "last.pth"
    stale, live, other = (tmp_path / ".last.pth.abc123.tmp", tmp_path / ".last.pth.def456.tmp",
                          tmp_path / ".best.pth.ghi789.tmp")
    for f in (stale, live, other):
        f.write_bytes(b"half a checkpoint")
    old = time.time() - checkpoint.STALE_S - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    checkpoint.save({"model": "three", "state_dict": {}, "i": 1}, str(path))
    assert checkpoint.load(str(path))["i"] == 1
    assert not stale.exists() and live.exists() and other.exists()  # a live writer's file, another file's: kept


def test_reports_and_submissions_are_written_atomically(tmp_path, monkeypatch):
    target = tmp_path / "submission.csv"
    test = types.SimpleNamespace(ids=["a", "b", "c"])  # the test split's ids, as its loader holds them

    def submit(ids, preds):  # probabilities whose argmax is each pred
        report.write_submission(torch.nn.functional.one_hot(torch.tensor(preds), 5).float(), torch.tensor(ids), test,
                                str(target))
    submit([0, 1], [1, 2])
    assert target.read_text() == "image_id,label\na,1\nb,2\n"
    good = target.read_text()

    def torn(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", torn)  # the write fails half way
    with pytest.raises(OSError):
        submit([0, 1, 2], [0, 0, 0])
    assert target.read_text() == good and os.listdir(tmp_path) == ["submission.csv"]
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~checkpoint._umask()  # not mkstemp's 0600


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(tmp_path, tiny_data, run_main):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    evil = tmp_path / "evil.pth"
    torch.save({"model": "three", "state_dict": models.ThreeCNN().state_dict(), "config": {}, "x": Payload()}, evil)
    rc, _, err = run_main(base_args(tiny_data, tmp_path) + ["--evaluate", evil])
    assert rc == 2 and "pickled code" in err and str(evil) in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- numerics

def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, run_main,
                                                                                 monkeypatch):
    real = models.ThreeCNN.forward
    calls = {"train": 0}

    def forward(self, x):
        out = real(self, x)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 2 + 2:  # epoch 2 (2 steps per epoch), step 2
                return out * float("nan")
        return out
    monkeypatch.setattr(models.ThreeCNN, "forward", forward)
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--epochs", "3", "--amp", "bf16", "--channels-last"))  # no timing
    assert rc == 3 and err.count("\n") == 1 and err.startswith("error: loss became nan at epoch 2, step 2")
    assert f"the last good checkpoint is {tmp_path / 'runs' / 'r' / 'last.pth'}" in err
    assert epoch_of(tmp_path / "runs" / "r" / "last.pth") == 1
    assert torch.isfinite(torch.load(tmp_path / "runs" / "r" / "last.pth", weights_only=True)
                          ["state_dict"]["features.0.weight"]).all()


def test_detect_anomaly_flag(tiny_data, tmp_path, run_main, monkeypatch):
    seen = []
    real = models.ThreeCNN.forward
    monkeypatch.setattr(models.ThreeCNN, "forward", lambda self, x: seen.append(torch.is_anomaly_enabled()) or real(self, x))
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "1", "--detect-anomaly"))[0] == 0
    assert seen and all(seen)
    seen.clear()
    assert run_main(base_args(tiny_data, tmp_path / "b", "--epochs", "1"))[0] == 0
    assert seen and not any(seen)


# ---------------------------------------------------------------------------------------------- resources

def test_out_of_memory_names_the_batch_size_and_the_flag(tiny_data, tmp_path, run_main, monkeypatch):
    def oom(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(models.ThreeCNN, "forward", oom)
    rc, _, err = run_main(base_args(tiny_data, tmp_path))
    assert rc == 2 and "batch size 8" in err and "--batch-size 4" in err and len(err.strip().splitlines()) == 1


def test_unwritable_output_folder_is_reported_before_training(tiny_data, tmp_path, run_main):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = base_args(tiny_data, tmp_path)
    args[args.index("--out-dir") + 1] = blocker / "runs"
    rc, out, err = run_main(args)
    assert rc == 2 and "cannot write to" in err and "epoch" not in out


def test_runs_checking_a_shared_folder_at_the_same_time_do_not_fail_each_other(tmp_path):
    """tools/sweep.py's runs share --ckpt-dir: each one's write check must not remove the other's probe (a shared
    probe name made ~1 in 10 checks fail as 'cannot write' with two threads checking at once)."""
    import threading
    failures = []

    def check_many():
        for _ in range(300):
            try:
                folders.check_output({"ckpt_dir": str(tmp_path)}, str(tmp_path), torch.nn.Linear(1, 1))
            except dataset.UserError as e:
                failures.append(str(e))
    threads = [threading.Thread(target=check_many) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and os.listdir(tmp_path) == []  # and no probe left behind


def test_full_disk_is_reported_before_training(tiny_data, tmp_path, run_main, monkeypatch):
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    rc, out, err = run_main(base_args(tiny_data, tmp_path))
    assert rc == 2 and "MB free" in err and "epoch" not in out


def test_evaluation_out_of_memory_halves_the_batch_and_gives_the_same_predictions(tiny_data, tmp_path, capsys,
                                                                                monkeypatch):
    import dataloader
    data = dataset.load_split_tensors(tiny_data, "validation", str(tmp_path / "cache"), log=lambda *m: None)
    model = models.ThreeCNN().eval()
    cfg = {**recipes.DEFAULTS, "quiet": True}
    device = torch.device("cpu")

    def loader(batch):
        return dataloader.TensorBatches(data["images"], data["labels"], data["ids"], batch, False, device)
    expected = inference.predict_probs(model, loader(20), cfg, device, None)[0]
    forward = models.ThreeCNN.forward

    def small_gpu(self, x):  # a card that holds at most 5 images at a time
        if len(x) > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, x)
    monkeypatch.setattr(models.ThreeCNN, "forward", small_gpu)
    batches = loader(20)
    probs, pos, _, count = inference.predict_probs(model, batches, cfg, device, None)
    assert batches.batch_size == 5 and count == 20 and pos.tolist() == list(range(20))
    assert torch.allclose(probs, expected, atol=1e-5)
    assert "evaluating at 10" in capsys.readouterr().out


def _oom_in_evaluation(monkeypatch, when):
    """ThreeCNN runs out of memory in evaluation (eval mode) whenever when(x) says so."""
    forward = models.ThreeCNN.forward

    def patched(self, x):
        if not self.training and when(x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, x)
    monkeypatch.setattr(models.ThreeCNN, "forward", patched)


def test_validation_out_of_memory_in_a_run_halves_the_evaluation_batch(tiny_data, tmp_path, run_main, monkeypatch):
    _oom_in_evaluation(monkeypatch, lambda x: len(x) > 2)  # a card that evaluates 2 images at a time
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--eval-batch-size", "8"))
    assert rc == 0, err
    assert "evaluating at 4" in out and "evaluating at 2" in out and "epoch   2/2" in out
    assert (tmp_path / "runs" / "r" / "submission.csv").exists()


@pytest.mark.parametrize("at_epoch", [1, 2])
def test_validation_out_of_memory_when_shared_out_names_the_flag_and_the_resume(tiny_data, tmp_path, run_main,
                                                                               monkeypatch, at_epoch):
    # Under torchrun each process validates its share of every batch, so the batch cannot be halved there:
    # the validation loader is given a share here (process 0 of 2) without starting processes.
    loaders_for = dataloader.loaders_for

    def shared_validation(cfg, device, splits, train_split=None, sharded=True, data=None):
        out = loaders_for(cfg, device, splits, train_split, sharded, data)
        if train_split:
            out["validation"].rank, out["validation"].world = 0, 2
        return out
    monkeypatch.setattr(dataloader, "loaders_for", shared_validation)
    last = tmp_path / "runs" / "r" / "last.pth"
    _oom_in_evaluation(monkeypatch, lambda x: at_epoch == 1 or last.exists())
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--eval-batch-size", "8"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "validating at batch 8" in err
    if at_epoch == 1:  # nothing saved yet
        assert "start again with --eval-batch-size 4" in err and not last.exists()
        return
    assert f"--resume {tmp_path / 'runs' / 'r'} --eval-batch-size 4" in err
    monkeypatch.undo()
    rc, out, err = run_main(["--resume", tmp_path / "runs" / "r", "--eval-batch-size", "4"])
    assert rc == 0 and "resuming" in out and "epoch   2/2" in out, err


def test_out_of_memory_evaluating_one_image_is_one_line(tiny_data, tmp_path, run_main, monkeypatch):
    _oom_in_evaluation(monkeypatch, lambda x: True)
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--eval-batch-size", "2"))
    assert rc == 2 and "evaluating at 1" in out
    assert err.strip().splitlines() == ["error: the GPU ran out of memory: close other programs using it, or lower "
                                        "--eval-batch-size"]


def test_training_uses_fused_adam_also_when_resuming_an_older_checkpoint(tiny_data, tmp_path, run_main, monkeypatch):
    """The flag must be in the state Adam loads, not only set after: loading puts the step counters where
    that flag says (on a GPU, fused Adam refuses counters left on the CPU; seen on an H200)."""
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "1"))[0] == 0
    last = tmp_path / "runs" / "r" / "last.pth"
    ck = torch.load(last, weights_only=True)
    assert all(g["fused"] is True for g in ck["optimizer"]["param_groups"])
    for g in ck["optimizer"]["param_groups"]:
        g["fused"] = None  # as PyTorch's default Adam writes it
    ck["finished"], ck["config"]["epochs"] = False, 2
    checkpoint.save(ck, str(last))
    loaded, load = [], torch.optim.Adam.load_state_dict
    monkeypatch.setattr(torch.optim.Adam, "load_state_dict",
                        lambda opt, sd: (loaded.append([g["fused"] for g in sd["param_groups"]]), load(opt, sd))[1])
    assert run_main(["--resume", last, "--quiet"])[0] == 0
    assert loaded and all(f is True for flags in loaded for f in flags)
    assert all(g["fused"] is True for g in torch.load(last, weights_only=True)["optimizer"]["param_groups"])


def test_runs_started_in_the_same_second_get_a_folder_each(tmp_path, fixed_clock):
    cfg = {"run_name": None, "model": "three", "out_dir": str(tmp_path / "runs")}
    made = [folders.new_run_dir(cfg) for _ in range(3)]  # a seed sweep started with '&': none has saved yet
    assert [os.path.basename(f) for f in made] == ["three-20260102-030405", "three-20260102-030405-2",
                                                      "three-20260102-030405-3"]
    assert all(os.path.isdir(f) for f in made)
