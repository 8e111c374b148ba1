"""Promotion: a run's best checkpoint made CKPT_DIR/<model>_best.pth (models_pth/ by default), where --model
ensemble, --predict and users look for it, as one locked transaction: an earlier best that scored higher on the
same validation images stays, any other is kept aside under a new name, and a kill at any instant leaves the
old file or the new one. A run folder notes that its promotion happened (promotion.txt); a resumed run that
finished without it (killed at that moment) promotes then.
"""
import datetime
import filecmp
import os
import shutil

import torch

from engine import checkpoint, locks
from engine.checkpoint import claim_new_path
from engine.runtime import log

PROMOTED = "promotion.txt"  # in a run folder once its best was compared with CKPT_DIR's (what happened, one line)


def promote_best(cfg, run_dir, ckpt=None):
    """The run's best compared with CKPT_DIR's (promote, below), and that it was, noted in the run folder."""
    line = promote(os.path.join(run_dir, "best.pth"), cfg, ckpt)
    checkpoint.atomic_write_text(os.path.join(run_dir, PROMOTED), line + "\n")


def write_validation_figure(best, ckpt, accuracy):
    """best.pth (loaded as ckpt) with the validation accuracy it was judged at, the figure its promotion is compared
    on. Returns the checkpoint as saved."""
    if ckpt.get("val_acc") != accuracy:
        ckpt = {**ckpt, "val_acc": accuracy}
        checkpoint.save(ckpt, best)
    return ckpt


def validation_figure(ckpt):
    """A checkpoint's validation accuracy as judged at the end of its run (None where unknown: a run from before
    runs recorded it, unless it was chosen on validation, where its best_acc is that accuracy)."""
    if ckpt.get("val_acc") is not None:
        return ckpt["val_acc"]
    return ckpt["best_acc"] if (ckpt.get("config") or {}).get("select", "val") == "val" else None


def promote(best, cfg, new=None):
    """Make a run's best CKPT_DIR/<model>_best.pth, where --model ensemble and --predict users look, as one
    transaction under a lock on that file (runs ending together take turns): an earlier one that scored higher
    on the same validation images stays (a 2-epoch try must not displace a 10-hour run); any other earlier one is
    kept aside under a new name (a hard link: no copy, and at no instant is there no <model>_best.pth), then the
    new one replaces it in one os.replace. A kill at any point leaves the old file or the new one. The figure
    compared is each checkpoint's validation accuracy, whatever chose it (--select). new: best.pth as loaded, where
    at hand. Returns the line it logged."""
    dest = os.path.join(cfg["ckpt_dir"], f"{cfg['model']}_best.pth")
    with locks.held(os.path.join(cfg["ckpt_dir"], f".{cfg['model']}_best.lock")):
        line = _promote(best, dest, cfg, new)
    log(line)
    return line


def keep_aside(src, path):
    """`src` also under `path` (FileExistsError if taken): a hard link, or a copy where links are not supported."""
    try:
        os.link(src, path)
    except FileExistsError:
        raise
    except OSError:
        with open(src, "rb") as f, open(path, "xb") as out:
            shutil.copyfileobj(f, out)


def _promote(best, dest, cfg, new):
    if os.path.exists(dest) and filecmp.cmp(best, dest, shallow=False):  # a finished run resumed: already there
        return f"best checkpoint: {dest}"
    if os.path.exists(dest):
        new = new or torch.load(best, map_location="cpu", weights_only=True)
        try:
            old = torch.load(dest, map_location="cpu", weights_only=True)
            same_rows = (old.get("data") or {}).get("validation", [])[:2] == new["data"]["validation"][:2]
            old_acc = validation_figure(old)
        except Exception:  # unreadable: kept aside below, as any other
            same_rows, old_acc = False, None
        if same_rows and old_acc is not None and old_acc > new["val_acc"]:
            return (f"kept {dest}: validation accuracy {100 * old_acc:.2f}%, more than this run's "
                    f"{100 * new['val_acc']:.2f}% (its best stays in {best})")
        stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
        aside = claim_new_path(os.path.join(cfg["ckpt_dir"], f"{cfg['model']}_best.{stamp}"), ".pth",
                               lambda p: keep_aside(dest, p))
        log(f"kept the previous {dest} as {aside}")
    with open(best, "rb") as f:
        checkpoint.atomic_write_bytes(dest, f.read())
    return f"best checkpoint: {dest}"
