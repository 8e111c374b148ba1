"""Run folders and the files a run keeps in them: a new folder per run (held by a lock while it trains), finding /
checking / opening a run to resume, config.json and the per-epoch log.csv, and a run's state written to
last.pth / best.pth (the state itself, and how it is saved and restored, is state.py's; promotion of the best
to models_pth/ is promote.py's).
"""
import csv
import datetime
import glob
import io
import json
import os
import shutil
import tempfile

import torch

import models
from engine import checkpoint, locks, runtime
from engine.checkpoint import claim_new_path
from engine.errors import DISK_ERRORS, UserError
from engine.promote import PROMOTED
from engine.recipes import DEFAULTS, RESUME_MAY_CHANGE, absolute_paths, stops_early
from engine.runtime import log

LOG_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "holdout_acc", "seconds"]


# ==============================================================================================
# New folders

def new_run_dir(cfg):
    """A new folder for the run, never an earlier run's; runs started in the same second, as a seed sweep
    starts them, get one folder each."""
    name = cfg["run_name"] or f"{cfg['model']}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    try:
        return claim_new_path(os.path.join(cfg["out_dir"], name), "", os.makedirs)
    except OSError as e:
        raise UserError(f"cannot write to {cfg['out_dir']} ({e.strerror}): pass a writable --out-dir")


_HELD = []  # the lock of the run folder this process trains, held until it exits


def hold_run_dir(run_dir):
    """One run folder, one process: a second process training (or resuming) the same folder is refused in one line,
    not left to train it twice into one log. The lock goes with the process, however it ends."""
    try:
        _HELD.append(locks.acquire(os.path.join(run_dir, ".lock"), wait=False))
    except locks.Busy:
        raise UserError(f"{run_dir} is being trained by another process right now: wait for it to end (or stop it), "
                        f"or start a new run")


def release_run_dir():
    while _HELD:
        locks.release(_HELD.pop())


def command_dir(cfg, verb, model):
    """The folder of an --evaluate / --predict / --analyze: <out-dir>/<verb>-<model>-<time>."""
    d = new_run_dir({**cfg, "run_name": cfg["run_name"] or f"{verb}-{model}-{datetime.datetime.now():%Y%m%d-%H%M%S}"})
    os.makedirs(d, exist_ok=True)
    return d


def check_output(cfg, run_dir, model):
    """Report an unwritable or full output folder before training, not at the first save."""
    need = 4 * sum(p.numel() * p.element_size() for p in model.parameters()) * 3 + (50 << 20)
    for d in (run_dir, cfg["ckpt_dir"]):
        try:
            os.makedirs(d, exist_ok=True)
            # A probe file of its own name: runs sharing a folder (tools/sweep.py, models_pth/) check it at the same time,
            # and one removing a shared name under another made that one fail as if the folder were unwritable.
            with tempfile.NamedTemporaryFile("w", dir=d, prefix=".write-test-") as f:
                f.write("ok")
        except OSError as e:
            raise UserError(f"cannot write to {d} ({e.strerror}): pass a writable --out-dir / --ckpt-dir")
        free = shutil.disk_usage(d).free
        if free < need:
            raise UserError(f"{d} has {free >> 20} MB free, a run needs about {need >> 20} MB for checkpoints: "
                            f"free some space or pass another --out-dir / --ckpt-dir")


# ==============================================================================================
# Resuming

def find_resume(cfg, path, model=None):
    """The last.pth to resume: PATH's, or for a bare --resume the latest run's under --out-dir (of `model` when
    --model was given: its folders are named <model>-<time>)."""
    if path == "latest":
        runs = sorted(glob.glob(os.path.join(glob.escape(cfg["out_dir"]), f"{model}-*" if model else "*", "last.pth")),
                      key=os.path.getmtime)
        if not runs:
            raise UserError(f"--resume: no run{f' of {model!r}' if model else ''} with a last.pth under "
                            f"{cfg['out_dir']}/: pass the run folder or its last.pth")
        return runs[-1]
    if not os.path.isdir(path):
        return path
    last = os.path.join(path, "last.pth")
    inside = sorted(glob.glob(os.path.join(glob.escape(path), "*", "last.pth")), key=os.path.getmtime)
    if not os.path.exists(last) and inside:  # the runs folder itself, say
        raise UserError(f"--resume {path}: not a run folder (no last.pth); the latest run in it is "
                        f"{os.path.dirname(inside[-1])}: pass that one")
    return last


def check_resume_config(saved, given, path):
    saved, given = absolute_paths(saved), absolute_paths(given)  # 'dataset' and '/home/me/dataset' agree
    for k, v in given.items():
        if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v:
            raise UserError(f"cannot resume {path} with --{k.replace('_', '-')} {v}: that run used {saved[k]!r} "
                            f"(start a new run, or drop the flag)")


def check_resume_data(ckpt, now, cfg, path):
    """A run resumes on the rows it trained on: its saved epoch plan indexes train.csv's rows. Images whose files
    changed under the same rows (another size or time: a new download, an edited image) are used as they are
    now, and said once: refusing would stop every run whose data was merely copied again."""
    saved = ckpt.get("data")
    if saved is None and ckpt["plan"] is not None:  # a checkpoint from before the digests: its plan's length
        saved = {"train": [len(ckpt["plan"]["order"]), None]}
    for split, (rows, digest, *files) in (saved or {}).items():
        same = now[split][1] == digest if digest else now[split][0] == rows
        if not same:
            raise UserError(f"cannot resume {path}: {os.path.join(cfg['data_dir'], split + '.csv')} has changed since "
                            f"the run started ({now[split][0]} rows, it had {rows}): restore it, or start a new run")
        if files and files[0] != now[split][2]:
            log(f"note: image files of {split} changed since the run started (size or time): it goes on with them "
                f"as they are now")


def early_stop(cfg):
    return "off" if cfg["early_stop"] is None else cfg["early_stop"]


def open_resume(cfg, given, resume):
    """The checkpoint to resume, the run's own settings, and what is left to do: 'train', 'finish' (training
    ended but the report and submission were never written: stopped by Ctrl-C or a full disk in between),
    'promote' (all but the promotion of its best: killed, or CKPT_DIR unwritable, at that moment) or 'nothing'.
    A finished run trains again where a larger --epochs or --early-stop gives it room."""
    path = find_resume(cfg, resume, cfg["model"] if "model" in given else None)
    ckpt = checkpoint.load(path, expect_model=cfg["model"] if "model" in given else None)
    if not {"optimizer", "plan", "rng", "finished"} <= set(ckpt):
        raise UserError(f"{path} holds weights but no training state: resume from a run's last.pth (or its folder)")
    check_resume_config(ckpt["config"], given, path)
    # Settings added since the run started take their defaults, which are what the run did.
    cfg = {**DEFAULTS, **ckpt["config"], **{k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}}
    run_dir = os.path.dirname(os.path.abspath(path))
    planned = ckpt["config"]["epochs"]
    if planned % 1 and ckpt["epoch"] > planned and cfg["epochs"] > planned:
        # Its last epoch trained only its share of the steps and its rate reached zero there: going on would train
        # neither the run a larger --epochs makes from the start nor a schedule that ends at zero.
        raise UserError(f"{path}: this run ended inside its last epoch (--epochs {planned}), so it cannot go on to "
                        f"--epochs {cfg['epochs']}: train a new run with --epochs {cfg['epochs']}")
    todo = "train"
    if ckpt["finished"]:
        limits = [flag for flag, hit in (("--epochs", ckpt["epoch"] >= cfg["epochs"]),
                                         ("--early-stop", stops_early(cfg, ckpt["bad_epochs"]))) if hit]
        if limits and not os.path.exists(os.path.join(run_dir, "submission.csv")):
            log(f"{path}: the run finished training but not its report and submission: writing them")
            todo = "finish"
        elif limits and not os.path.exists(os.path.join(run_dir, PROMOTED)):
            log(f"{path}: the run finished but its best checkpoint was never compared with {cfg['ckpt_dir']}'s: "
                f"doing that now")
            todo = "promote"
        elif limits:
            log(f"{path}: this run already finished (epoch {ckpt['epoch']} of --epochs {cfg['epochs']}; "
                f"{ckpt['bad_epochs']} epochs without gain, --early-stop {early_stop(cfg)}; best val acc "
                f"{100 * ckpt['best_acc']:.2f}% at epoch {ckpt['best_epoch']}); nothing to do. To train it "
                f"further, resume with a larger {' and '.join(limits)}")
            todo = "nothing"
        else:
            log(f"{path}: the run had finished at epoch {ckpt['epoch']}; training it further (--epochs "
                f"{cfg['epochs']}, --early-stop {early_stop(cfg)})")
    return ckpt, cfg, path, run_dir, todo



# ==============================================================================================
# config.json and the log, and the best checkpoint where users find it

def start_log(run, resumed):
    """config.json, the log (a resumed run continues its own; rows past the checkpoint are dropped), and the
    lines that say what trains where."""
    cfg, device, amp = run.state.cfg, run.state.device, run.state.amp
    write_config(run)
    write_log(run.log_csv, kept_log_rows(run.log_csv, run.state.epoch) if resumed else [])
    for note in (runtime.device_note(cfg, device), runtime.precision_note(cfg, device, amp)):
        if note:
            log(note)
    log(f"run folder: {run.run_dir}\nmodel {cfg['model']} ({models.count_params(run.state.raw, True):,} trainable "
        f"parameters) on {runtime.device_name(device)}, precision {runtime.dtype_name(amp)}"
        f"{' channels_last' if run.state.channels_last else ''}, {runtime.WORLD} process(es), loader "
        f"{type(run.train_batches).__name__}")


def write_config(run):
    """config.json: the run's settings, and where and how it trains."""
    cfg, device = run.state.cfg, run.state.device
    cfg_out = {**cfg, "device_name": runtime.device_name(device), "amp_dtype": str(run.state.amp),
               "world_size": runtime.WORLD, "torch": torch.__version__}
    checkpoint.atomic_write_text(os.path.join(run.run_dir, "config.json"), json.dumps(cfg_out, indent=2))


def write_log(path, rows):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    checkpoint.atomic_write_text(path, buf.getvalue())


def append_log(path, row):
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=LOG_FIELDS, lineterminator="\n").writerow(row)
        f.flush()
        os.fsync(f.fileno())


def kept_log_rows(path, epoch):
    """The log rows of epochs up to `epoch` (a resumed run continues its log; rows past its checkpoint go)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["epoch"]) <= epoch]


def write(run, fn, *args):
    """A disk that fills up (or a folder that loses its write permission) mid-run: one line with the way back,
    not a traceback. What was written before is intact: every file is replaced atomically."""
    try:
        fn(*args)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        then = f"resume with: python main.py --resume {run.run_dir}" if os.path.exists(run.last) else "start again"
        raise UserError(f"could not write to {run.run_dir} ({e.strerror}): free some space there (or fix its "
                        f"permissions), then {then}")


def save_state(run, path):
    """The run's state (state.TrainState.state_dict()) written to `path`, atomically."""
    write(run, checkpoint.save, run.state.state_dict(), path)
