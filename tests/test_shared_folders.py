"""Runs that share folders or die at the wrong moment lose nothing: promotion to models_pth/ as a transaction,
one builder at a time for the demo set and the decode cache, one process per run folder, errors on stderr."""
import errno
import os
import subprocess
import sys

import pytest
import torch

from engine import checkpoint
from engine import promote
from conftest import ROOT, WITH_ROOT, base_args


@pytest.fixture(scope="module")
def best(tiny_data, tmp_path_factory):
    """A run's best.pth, judged on validation (so it carries val_acc)."""
    tmp = tmp_path_factory.mktemp("best")
    import main
    assert main.main([str(a) for a in base_args(tiny_data, tmp, "--epochs", "1")]) == 0
    return tmp / "runs" / "r" / "best.pth"


def variant(best, folder, val_acc):
    """A copy of best.pth that scored `val_acc` on the same validation images."""
    path = folder / f"best-{val_acc}.pth"
    checkpoint.save({**torch.load(best, weights_only=True), "val_acc": val_acc}, str(path))
    return path


PROMOTE_SLOWLY = """
import time
import torch
from engine import promote
real = torch.load
def slow_load(*a, **k):  # every run reads the earlier best at the same moment: their ends coincide
    time.sleep(0.4)
    return real(*a, **k)
torch.load = slow_load
while time.time() < {start}:
    time.sleep(0.01)
promote.promote({path!r}, {{"ckpt_dir": {ckpt!r}, "model": "three"}})
"""


def test_runs_promoting_at_once_leave_the_best_of_them_and_every_earlier_best_aside(best, tmp_path):
    import time
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    first = variant(best, tmp_path, 0.1)
    (ckpt / "three_best.pth").write_bytes(first.read_bytes())  # an earlier, worse best
    accs = [0.3, 0.9, 0.5, 0.7, 0.6]
    start = time.time() + 6  # once every process has imported PyTorch
    procs = [subprocess.Popen([sys.executable, "-c", PROMOTE_SLOWLY.format(
        start=start, path=str(variant(best, tmp_path, a)), ckpt=str(ckpt))], stdout=subprocess.PIPE,
        text=True, env=WITH_ROOT) for a in accs]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    dest = torch.load(ckpt / "three_best.pth", weights_only=True)
    assert dest["val_acc"] == 0.9  # the best of the runs that finished
    aside = [torch.load(p, weights_only=True)["val_acc"] for p in ckpt.glob("three_best.*-*.pth")]
    kept_out = [a for a, out in zip(accs, outs) if "kept " in out and "more than this run's" in out]
    assert 0.1 in aside and sorted(aside + kept_out + [0.9]) == sorted(accs + [0.1])  # nothing lost, nothing twice


@pytest.mark.parametrize("dies_at", ["keeping the old aside", "writing the new"])
def test_a_kill_during_promotion_leaves_a_whole_best_and_the_resume_completes_it(tiny_data, tmp_path, run_main,
                                                                                 monkeypatch, dies_at):
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "1"))[0] == 0
    run, dest = tmp_path / "runs" / "r", tmp_path / "ckpt" / "three_best.pth"
    old = variant(run / "best.pth", tmp_path, 0.0)
    dest.write_bytes(old.read_bytes())  # an earlier, worse best: this run's promotion will replace it
    (run / promote.PROMOTED).unlink()

    def killed(*a, **k):
        raise KeyboardInterrupt  # as a SIGKILL would stop it there, with nothing after
    if dies_at == "keeping the old aside":
        monkeypatch.setattr(promote, "keep_aside", killed)
    else:
        monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        promote.promote(str(run / "best.pth"), {"ckpt_dir": str(tmp_path / "ckpt"), "model": "three"})
    monkeypatch.undo()
    assert dest.read_bytes() == old.read_bytes()  # the old one, whole
    rc, out, err = run_main(["--resume", run])
    assert rc == 0 and "never compared with" in out, err
    assert dest.read_bytes() == (run / "best.pth").read_bytes() and (run / promote.PROMOTED).exists()
    aside = list((tmp_path / "ckpt").glob("three_best.*-*.pth"))
    assert [p.read_bytes() for p in aside if p.read_bytes() == old.read_bytes()]  # the earlier best, kept aside
    assert "nothing to do" in run_main(["--resume", run])[1]


def test_a_promotion_stopped_by_a_read_only_folder_is_completed_on_resume(tiny_data, tmp_path, run_main, monkeypatch):
    def read_only(best, cfg, new=None):
        raise PermissionError(errno.EACCES, "Permission denied", cfg["ckpt_dir"])
    monkeypatch.setattr(promote, "promote", read_only)
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--epochs", "1"))
    assert rc == 2 and err.startswith("error: Permission denied") and err.count("\n") == 1
    run = tmp_path / "runs" / "r"
    assert (run / "submission.csv").exists() and not (tmp_path / "ckpt" / "three_best.pth").exists()
    monkeypatch.undo()
    rc, out, err = run_main(["--resume", run])
    assert rc == 0 and (tmp_path / "ckpt" / "three_best.pth").read_bytes() == (run / "best.pth").read_bytes(), err


CHECK_DEMO = """
import time
import dataset
from engine import demo_data
demo_data.SPLIT_SIZES = {{"train": 40, "validation": 10, "test": 10}}
while time.time() < {start}:
    time.sleep(0.01)
demo_data.ensure_if_asked("demo_data")  # what a --demo run does first
rows = dataset.resume_digests(dataset.check_data("demo_data"))
print(rows["train"][0])
"""


def test_two_demo_runs_started_together_on_a_fresh_folder_both_get_the_whole_set(tmp_path):
    import time
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", CHECK_DEMO.format(start=start)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=WITH_ROOT) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert [o.strip().splitlines()[-1] for o, _ in outs] == ["40"] * 3
    assert sum("building" in o for o, _ in outs) == 1  # one builder; the others waited for it
    assert sorted(os.listdir(tmp_path)) == [".demo_data.lock", "demo_data"]  # nothing half-built left beside it


def test_a_dead_writers_cache_temporary_is_removed_and_a_cache_of_another_layout_is_decoded_again(tiny_data,
                                                                                                  tmp_path):
    import dataset
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".validation-abc123.tmp").write_bytes(b"x" * 1000)  # a writer killed mid-write (in a real split: 375 MB)
    (cache / "tmpold.tmp").write_bytes(b"x")  # another split's or another program's: not this one's to remove
    msgs = []
    good = dataset.load_split_tensors(tiny_data, "validation", str(cache), log=msgs.append)
    assert sorted(os.listdir(cache)) == [".validation.lock", "tmpold.tmp",
                                         next(f for f in os.listdir(cache) if f.endswith(".pt"))]
    path = next(cache.glob("validation-*.pt"))
    torch.save({**good, "images": good["images"].permute(0, 2, 3, 1).contiguous()}, path)  # the right name, HWC
    again = dataset.load_split_tensors(tiny_data, "validation", str(cache), log=msgs.append)
    assert torch.equal(again["images"], good["images"]) and sum(m.startswith("decoding") for m in msgs) == 2
    assert torch.load(path, weights_only=True)["images"].shape == (20, 3, 100, 100)  # and the cache made right


def test_runs_decoding_one_split_at_once_decode_it_once(tiny_data, tmp_path, monkeypatch):
    import threading
    import time
    import dataset
    decode = dataset.decode_image
    monkeypatch.setattr(dataset, "decode_image", lambda p: (time.sleep(0.02), decode(p))[1])  # slow enough to meet
    msgs, got = [], []

    def run():
        got.append(dataset.load_split_tensors(tiny_data, "validation", str(tmp_path / "cache"), threads=1,
                                              log=msgs.append))
    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(m.startswith("decoding") for m in msgs) == 1  # the others waited for its cache
    assert all(torch.equal(g["images"], got[0]["images"]) for g in got) and len(got) == 3


def test_a_second_process_training_the_same_run_folder_is_refused_in_one_line(tiny_data, tmp_path, run_main):
    from engine import locks
    assert run_main(base_args(tiny_data, tmp_path, "--epochs", "1"))[0] == 0
    run = tmp_path / "runs" / "r"
    other = locks.acquire(str(run / ".lock"))  # another process at work on it (a lock is per open file)
    try:
        rc, out, err = run_main(["--resume", run, "--epochs", "2"])
    finally:
        locks.release(other)
    assert rc == 2 and err.count("\n") == 1 and "is being trained by another process right now" in err
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1  # untouched
    assert run_main(["--resume", run, "--epochs", "2"])[0] == 0  # once it has ended


def test_a_nan_in_the_first_epoch_says_no_checkpoint_exists_yet_on_stderr(tiny_data, tmp_path, run_main):
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--lr", "1e20", "--amp", "off"))
    assert rc == 3 and err.count("\n") == 1 and "error: loss became" in err and "at epoch 1" in err
    assert "no checkpoint was written yet" in err and "lower --lr" in err and "last.pth" not in err
    assert not (tmp_path / "runs" / "r" / "last.pth").exists()


def test_sigterm_to_a_sweep_stops_its_runs_resumably_and_still_writes_its_table(tiny_data, tmp_path):
    import json
    import signal
    import time
    out = tmp_path / "sweep"
    flags = ["--model", "three", "--data-dir", str(tiny_data), "--batch-size", "8", "--epochs", "500",
             "--early-stop", "500", "--ckpt-dir", str(tmp_path / "ckpt"), "--cache-dir", str(tmp_path / "cache")]
    p = subprocess.Popen([sys.executable, "-m", "tools.sweep", "--seeds", "0", "--out-dir", str(out), "--",
                          *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "01-three-s0" / "log.csv"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) > 1):
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)  # what `timeout`, a scheduler or a closed terminal sends
    stdout, stderr = p.communicate(timeout=120)
    assert "SIGTERM: stopping 1 run(s)" in stdout and "1 stopped" in stdout, stderr
    outcome = json.load(open(out / "sweep.json"))[0]
    assert outcome["status"] == "stopped"
    last = torch.load(out / "01-three-s0" / "last.pth", weights_only=True)
    assert not last["finished"] and last["epoch"] >= 1  # saved on the SIGTERM passed on: --resume continues it


def test_a_sweep_reports_a_nan_runs_own_cause(tiny_data, tmp_path, capsys):
    from tools import sweep
    flags = ["--model", "three", "--data-dir", str(tiny_data), "--batch-size", "8", "--epochs", "1", "--lr", "1e20",
             "--amp", "off", "--ckpt-dir", str(tmp_path / "ckpt"), "--cache-dir", str(tmp_path / "cache")]
    assert sweep.main(["--seeds", "0", "--out-dir", str(tmp_path / "sweep"), "--", *flags]) == 1
    assert "01-three-s0 failed: error: loss became" in capsys.readouterr().out  # not 'failed: exit 3'


def test_a_resume_after_an_images_pixels_changed_goes_on_and_says_so_once(copy_data, tmp_path, run_main):
    from PIL import Image
    assert run_main(base_args(copy_data, tmp_path, "--epochs", "1"))[0] == 0
    image = next(p for p in sorted(os.listdir(os.path.join(copy_data, "train"))) if p.endswith(".png"))
    Image.new("RGB", (100, 100), (1, 2, 3)).save(os.path.join(copy_data, "train", image))
    rc, out, err = run_main(["--resume", tmp_path / "runs" / "r", "--epochs", "2"])
    assert rc == 0 and out.count("note: image files of train changed since the run started") == 1, err
