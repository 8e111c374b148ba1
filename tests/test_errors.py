"""Every input a user can get wrong gives one clear line, a non-zero exit and no traceback."""
import errno
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch

from engine import checkpoint
import dataset
import models
from dataset import UserError
from conftest import ROOT, base_args, run_cli


def csv_path(d, split="train"):
    return os.path.join(d, f"{split}.csv")


def rewrite(path, fn):
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(fn(lines)) + "\n")


def first_id(d, split="train"):
    return open(csv_path(d, split)).read().splitlines()[1].split(",")[0]


def png_header(path, width, height):
    """A PNG that declares width x height but holds no pixels: Pillow checks the size when it opens it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def replace_image(d, make, split="train"):
    path = os.path.join(d, split, first_id(d, split) + ".png")
    os.remove(path)
    make(path)


# (name, how to damage the data copy, what the message must mention)
CASES = [
    ("image over Pillow's size limit", lambda d: png_header(os.path.join(d, "train", first_id(d) + ".png"), 20000, 10000),
     "cannot be read as an image (DecompressionBombError)"),  # was PIL's traceback
    ("dangling symlink as image", lambda d: replace_image(d, lambda p: os.symlink(p + ".gone", p)),
     "1 image(s) listed in"),  # was a FileNotFoundError traceback
    ("folder as image", lambda d: replace_image(d, os.mkdir, "validation"), "1 image(s) listed in"),
    ("data dir is a file", lambda d: (shutil.rmtree(d), open(d, "w").write("x")), "is a file, not a folder"),
    ("no data folder", lambda d: shutil.rmtree(d), "data folder"),
    ("no csv", lambda d: os.remove(csv_path(d, "validation")), "validation.csv not found"),
    ("no label column", lambda d: rewrite(csv_path(d), lambda l: ["image_id,klass"] + l[1:]), "no column label"),
    ("no image_id column", lambda d: rewrite(csv_path(d, "test"), lambda l: ["id"] + l[1:]), "no column image_id"),
    ("zero-byte csv", lambda d: open(csv_path(d), "w").close(), "empty or not a CSV"),
    ("header only", lambda d: rewrite(csv_path(d), lambda l: l[:1]), "no rows"),
    ("label not an integer", lambda d: rewrite(csv_path(d), lambda l: l[:3] + [l[3].split(",")[0] + ",cat"] + l[4:]),
     "row 4: label 'cat'"),
    ("label out of range", lambda d: rewrite(csv_path(d), lambda l: l[:2] + [l[2].split(",")[0] + ",7"] + l[3:]),
     "row 3: label '7'"),
    ("label not whole", lambda d: rewrite(csv_path(d), lambda l: l[:2] + [l[2].split(",")[0] + ",1.5"] + l[3:]),
     "is not an integer in 0..4"),
    ("duplicate id", lambda d: rewrite(csv_path(d), lambda l: l + [l[1]]), "appears more than once"),
    ("missing images", lambda d: [os.remove(os.path.join(d, "train", f)) for f in sorted(os.listdir(os.path.join(d, "train")))[:4]],
     "4 image(s) listed in"),
    ("missing image folder", lambda d: shutil.rmtree(os.path.join(d, "test")), "image folder"),
    ("corrupt image", lambda d: open(os.path.join(d, "train", first_id(d) + ".png"), "wb").write(b"\x89PNG\r\n\x1a\n garbage"),
     "cannot be read as an image"),
    ("truncated image", lambda d: (lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2))(
        os.path.join(d, "train", first_id(d) + ".png")), "cannot be read as an image"),
    ("text file as image", lambda d: open(os.path.join(d, "validation", first_id(d, "validation") + ".png"), "w").write("hello"),
     "cannot be read as an image"),
    ("corrupt test image", lambda d: open(os.path.join(d, "test", first_id(d, "test") + ".png"), "wb").write(b"junk"),
     "cannot be read as an image"),  # predicted only after training, but found before it
]


@pytest.mark.parametrize("name,damage,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_data_gives_one_line(name, damage, expect, copy_data, tmp_path, run_main):
    damage(copy_data)
    rc, out, err = run_main(base_args(copy_data, tmp_path))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0]
    if name not in ("no data folder",):
        assert copy_data in lines[0]  # it names the file or folder
    if name == "image over Pillow's size limit":
        assert os.path.join(copy_data, "train", first_id(copy_data) + ".png") in lines[0]
    assert not os.path.exists(tmp_path / "runs")  # failed before any run folder was made


# (flags, what the one line must say): numbers that mean nothing, refused before any run folder is made
BAD_NUMBERS = [
    (["--batch-size", "0"], "--batch-size 0: it must be at least 1"),  # was a ZeroDivisionError
    (["--lr", "-1"], "--lr -1.0: it must be a number above 0"),  # was a ValueError inside Adam
    (["--lr", "nan"], "--lr nan: it must be a number above 0"),
    (["--epochs", "0"], "--epochs 0: it must be at least 1"),  # made a run folder, then missed best.pth
    (["--ema", "1.5"], "--ema 1.5: it must be 0 (off) or a decay below 1"),
    (["--plateau-factor", "2"], "--plateau-factor 2.0: it must be above 0 and below 1"),
    (["--label-smoothing", "1"], "--label-smoothing 1.0: it must be 0 or more and below 1"),
    (["--workers", "-1", "--loader", "images"], "--workers -1: it must be 0 (no worker processes) or more"),
    (["--class-weights", "1,1,1,1,-2"], "--class-weights '1,1,1,1,-2': give 'auto' or five numbers of 0 or more"),
]


@pytest.mark.parametrize("flags,expect", BAD_NUMBERS, ids=[" ".join(f) for f, _ in BAD_NUMBERS])
def test_a_number_out_of_its_range_gives_one_line(flags, expect, tiny_data, tmp_path, run_main):
    rc, out, err = run_main(base_args(tiny_data, tmp_path, *flags))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith(f"error: {expect}"), err
    assert not os.path.exists(tmp_path / "runs")


def test_bad_image_in_a_loader_worker_gives_the_same_line(copy_data, tmp_path, run_main):
    bad = os.path.join(copy_data, "train", first_id(copy_data) + ".png")
    open(bad, "wb").write(b"not a png")
    rc, out, err = run_main(base_args(copy_data, tmp_path, "--loader", "images", "--workers", "1"))
    assert rc == 2 and err.strip().splitlines() == [f"error: {bad} cannot be read as an image (UnidentifiedImageError): "
                                                    f"replace it with the original or remove its row from the CSV"]


def test_cli_error_has_no_traceback(tmp_path):
    r = run_cli(["--model", "three", "--data-dir", tmp_path / "nowhere", "--out-dir", tmp_path / "runs"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "nowhere" in r.stderr


def test_ensemble_without_bases_names_what_is_missing(tiny_data, tmp_path, run_main):
    os.makedirs(tmp_path / "ckpt")
    checkpoint.save({"model": "three", "state_dict": models.ThreeCNN().state_dict(), "config": {}},
                    str(tmp_path / "ckpt" / "three_best.pth"))
    args = base_args(tiny_data, tmp_path)
    args[1] = "ensemble"
    rc, _, err = run_main(args)
    assert rc == 2 and "skip" in err and "skip_best.pth" in err and "three_best.pth" not in err
    assert len(err.strip().splitlines()) == 1


def write_ckpt(path, model_name, state_dict):
    checkpoint.save({"model": model_name, "state_dict": state_dict, "config": {}}, str(path))


def test_checkpoint_of_another_architecture(tiny_data, tmp_path, run_main):
    skip = tmp_path / "skip.pth"
    write_ckpt(skip, "skip", models.SkipConCNN().state_dict())
    rc, _, err = run_main(base_args(tiny_data, tmp_path) + ["--evaluate", skip])
    assert rc == 2 and "holds a 'skip' model, not 'three'" in err and str(skip) in err
    lying = tmp_path / "lying.pth"  # says three, holds other weights
    write_ckpt(lying, "three", models.SkipConCNN().state_dict())
    rc, _, err = run_main(base_args(tiny_data, tmp_path) + ["--evaluate", lying])
    assert rc == 2 and "does not fit the 'three' architecture" in err and len(err.strip().splitlines()) == 1


def test_a_pillow_warning_turned_error_is_the_same_one_line(tmp_path):
    """python -W error: Pillow's DecompressionBombWarning (an image over its limit but under twice it) raises."""
    path = str(tmp_path / "big.png")
    png_header(path, 10000, 9000)  # 90 million pixels: over Pillow's 89.5 million
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserError, match=r"big.png cannot be read as an image \(DecompressionBombWarning\)"):
            dataset.decode_image(path)


def test_a_16_bit_image_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    from PIL import Image
    gray = (np.arange(100 * 100).reshape(100, 100) * 6).astype(np.uint16)  # 0 .. 59,994
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = np.asarray(dataset.decode_image(str(tmp_path / "g16.png"))).astype(int)
    assert rgb.shape == (100, 100, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0] - gray / 257).max() <= 0.5  # Pillow's own conversion: 254.4 of 255 on average


def test_resume_of_weights_of_another_architecture_is_one_line(tiny_data, tmp_path, run_main):
    rc, _, err = run_main(base_args(tiny_data, tmp_path, "--epochs", "1"))
    assert rc == 0, err
    run = tmp_path / "runs" / "r"
    ckpt = torch.load(run / "last.pth", weights_only=True)
    ckpt.update(finished=False, epochs=3, state_dict=models.SkipConCNN().state_dict())  # says three, holds skip
    checkpoint.save(ckpt, str(run / "last.pth"))
    before = {f: (run / f).read_bytes() for f in ("last.pth", "best.pth", "log.csv", "config.json")}
    rc, _, err = run_main(["--resume", run, "--epochs", "3"])
    assert rc == 2 and "Traceback" not in err and err.strip().splitlines() == [err.strip()]
    assert f"checkpoint {run / 'last.pth'} does not fit the 'three' architecture" in err
    assert {f: (run / f).read_bytes() for f in before} == before  # nothing written or overwritten


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler, as in a terminal: a suite started in the background by a script inherits
    SIGINT ignored, and Python then installs no handler (a Ctrl-C would do nothing)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_importing_is_one_line_and_exit_130(tiny_data, tmp_path):
    """SIGINT while the program is still importing: once the module that checks the data is imported, PyTorch
    next. (One that a library swallows while it is imported is acted on later: the test below.)"""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", os.path.join(ROOT, "main.py"),
                             *map(str, base_args(tiny_data, tmp_path))],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    seen = []
    for line in proc.stderr:  # -X importtime prints a line as each module finishes importing
        seen.append(line)
        if line.split("|")[-1].strip() == "dataset":  # main() checks the data and imports PyTorch next
            break
    running = proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    lines = [l for l in err.splitlines() if not l.startswith("import time:")]
    assert running and seen[-1].endswith("dataset\n"), (f"the run ended, or its stderr did, before dataset was "
                                                       f"imported ({len(seen)} lines read): {''.join(seen)[-2000:]}"
                                                       f"\n{out[-500:]}")
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, lines[-20:], out[-1000:])
    assert lines == ["interrupted; the checkpoints already written are intact"]
    assert not os.path.exists(tmp_path / "runs")


def test_a_ctrl_c_that_a_library_swallows_while_starting_still_stops_the_run(tiny_data, tmp_path, run_main,
                                                                            monkeypatch, python_sigint):
    """The first optimizer imports Triton (torch._dynamo). A Ctrl-C raised while its C extension initialises is
    made an ImportError by pybind11, which PyTorch takes for "no Triton" and goes on: the run trained to its end
    and exited 0. Now it stops there, exit 130, before a run folder or checkpoint exists."""
    from engine import optim
    real = optim.make_optimizer

    def swallowing_import(*args, **kw):
        try:
            try:
                signal.raise_signal(signal.SIGINT)  # the user's Ctrl-C, in the middle of a C extension's import
            except KeyboardInterrupt as e:
                raise ImportError("initialization failed") from e  # what pybind11 makes of it
        except ImportError:
            pass  # what PyTorch makes of that
        return real(*args, **kw)
    monkeypatch.setattr(optim, "make_optimizer", swallowing_import)
    rc, out, err = run_main(base_args(tiny_data, tmp_path))
    assert rc == 130 and err.strip().splitlines() == ["interrupted; the checkpoints already written are intact"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ckpt").exists() and "epoch " not in out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main() put Python's own back


@pytest.mark.parametrize("kind", ["truncated", "random bytes", "not a checkpoint"])
def test_corrupt_checkpoint(kind, tiny_data, tmp_path, run_main):
    path = tmp_path / "bad.pth"
    write_ckpt(path, "three", models.ThreeCNN().state_dict())
    if kind == "truncated":
        open(path, "r+b").truncate(os.path.getsize(path) // 3)
    elif kind == "random bytes":
        for seed in range(200):  # random bytes reach many parts of the unpickler: each must give the one line
            path.write_bytes(bytes(np.random.default_rng(seed).integers(0, 256, 2000, dtype=np.uint8)))
            with pytest.raises(UserError, match="truncated or corrupt|corrupt") as e:
                checkpoint.load(str(path))
            assert "pickled code" not in str(e.value)  # that is said of real pickles only (below)
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    rc, _, err = run_main(base_args(tiny_data, tmp_path) + ["--predict", path])
    assert rc == 2 and str(path) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_plain_pickle_with_code_is_said_to_hold_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))
    path = tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps({"model": "three", "x": Payload()}, protocol=4))  # not torch.save's zip format
    with pytest.raises(UserError, match="holds pickled code and was refused"):
        checkpoint.load(str(path))


def test_torchrun_with_more_processes_than_gpus_is_one_line(tiny_data, tmp_path, run_main, monkeypatch):
    """torchrun --nproc_per_node=2 on a one-GPU machine: every process stops with the fix before any of them
    joins the process group (one that joined would wait there for the others for ever)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    joined = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: joined.append(a))
    rc, out, err = run_main(base_args(tiny_data, tmp_path, "--device", "cuda"))
    assert rc == 2 and not joined
    assert err.strip().splitlines() == ["error: torchrun started 2 processes on this machine, which has 1 GPU(s) "
                                        "(one process per GPU): use --nproc_per_node=1, or --device cpu"]


@pytest.mark.parametrize("device,expect", [
    ("foo", "--device foo: not a device: use cuda, cuda:N (the N-th GPU) or cpu"),  # was torch's RuntimeError
    ("cuda:3", "--device cuda:3: this machine has 1 GPU(s), cuda:0 to cuda:0"),
])
def test_a_device_that_is_not_there_is_one_line(device, expect, tiny_data, tmp_path, run_main, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    rc, _, err = run_main(base_args(tiny_data, tmp_path, "--device", device))
    assert rc == 2 and err.strip().splitlines() == [f"error: {expect}"]


def test_a_disk_that_fills_up_mid_run_is_one_line_and_the_run_resumes(tiny_data, tmp_path, run_main, monkeypatch):
    real, saves = checkpoint.save, []

    def save(obj, path):  # epoch 1 saves best.pth and last.pth; the third save is epoch 2's
        saves.append(path)
        if len(saves) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, path)
    monkeypatch.setattr(checkpoint, "save", save)
    rc, _, err = run_main(base_args(tiny_data, tmp_path))
    run = tmp_path / "runs" / "r"
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "No space left on device" in err
    assert f"python main.py --resume {run}" in err
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1  # epoch 1 is intact
    monkeypatch.setattr(checkpoint, "save", real)
    rc, _, err = run_main(["--resume", run])
    assert rc == 0, err
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 2


def test_an_unwritable_report_after_training_is_one_line(tiny_data, tmp_path, run_main, monkeypatch):
    from engine import report

    def denied(path, text):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    monkeypatch.setattr(report, "atomic_write_text", denied)
    rc, _, err = run_main(base_args(tiny_data, tmp_path))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "Permission denied" in err and "report.txt" in err
    assert torch.load(tmp_path / "runs" / "r" / "last.pth", weights_only=True)["finished"]  # training is kept
