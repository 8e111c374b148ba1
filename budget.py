"""--minutes N: a run sized to a time budget on this machine. Its step and evaluation are timed when it starts,
on a throwaway copy of the model, and the epochs that fit are chosen once and saved with the run's settings, so a
resume goes on to the same end and a fixed schedule (--scheduler linear, say) anneals exactly at it.

    epochs = (N minutes x MARGIN - setting up - the end of the run) / (an epoch's steps + its evaluations)
"""
import copy
import math
import time

import torch

import optim
import runtime
from errors import UserError
from runtime import log

# What the end of a run takes besides predicting (saving, reports, pictures): a few seconds measured on a 2-core
# CPU; and the share of the budget planned for, so that a machine that slows down a little still ends in time.
END_S = 20
MARGIN = 0.92
TIMED_S = 10  # time at most this long in all (after 2 untimed steps), in WINDOWS windows
WINDOWS = 3  # the fastest window counts: whatever else runs on the machine only ever slows a window down (a
# sizing just after a boot timed 67 img/s in one 10 s window; its epochs then trained at ~90 img/s)


def seconds_each(fn, steps):
    """Seconds per call of fn(): 2 untimed calls (first-call set-up), then WINDOWS windows of up to `steps` calls or
    TIMED_S / WINDOWS seconds each (at least one call); the fastest window's seconds per call."""
    for _ in range(2):
        fn()
    fastest = math.inf
    for _ in range(WINDOWS):
        t0, n = time.perf_counter(), 0
        while n < steps and (n == 0 or time.perf_counter() - t0 < TIMED_S / WINDOWS):
            fn()
            n += 1
        fastest = min(fastest, (time.perf_counter() - t0) / n)
    return fastest


def fit_epochs(budget_s, spent_s, epoch_s, end_s):
    """The whole epochs that fit in what is left of the budget once the end is set aside (at least 1)."""
    return max(1, math.floor((budget_s * MARGIN - spent_s - end_s) / epoch_s))


def size_epochs(run, step, started):
    """Times a training step and an evaluation batch here and returns the epochs that fit in --minutes. `step` is
    train.step; it runs on a copy of the model and optimizer, so the run's weights and random state are untouched."""
    if runtime.WORLD > 1:
        raise UserError("--minutes sizes a run of one process: under torchrun give --epochs")
    # Dropout draws from the global generators: forked, so the run draws what it would have without this timing
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        return _size_epochs(run, step, started)


def _size_epochs(run, step, started):
    cfg, tr, device = run.cfg, run.train_batches, run.device
    trial = copy.copy(run)
    trial.raw = trial.model = copy.deepcopy(run.raw).train()
    trial.opt = optim.make_optimizer(trial.raw.parameters(), cfg["lr"], cfg["weight_decay"], cfg["optimizer"])
    trial.sched = optim.make_scheduler(cfg, trial.opt, len(tr))
    trial.ema = None if run.ema is None else optim.make_ema(trial.raw, cfg["ema"])
    gen = torch.Generator().manual_seed(0)
    x, y, _ = next(tr.batches(tr.plan(gen), gen))

    def train_step():
        step(trial, x, y)
        runtime.sync(device)
    step_s = seconds_each(train_step, 8)
    views = 1 if not cfg["tta"] else 2 if cfg["tta_views"] == "flip" else 4  # at the end (and each epoch unless last)
    ex, _, _ = next(run.val_batches.batches(run.val_batches.plan()))
    trial.raw.eval()

    @torch.inference_mode()
    def evaluate():
        with torch.autocast(device.type, dtype=run.amp, enabled=run.amp is not None):
            for _ in range(views):
                trial.raw(ex)
        runtime.sync(device)
    eval_s = seconds_each(evaluate, 4) / len(ex)  # per image, all views
    judged = run.val_batches.n + (run.holdout_batches.n if run.holdout_batches is not None else 0)
    judging_s = judged * eval_s / (views if cfg["select"] == "last" else 1)  # each epoch's, TTA where it decides
    epoch_s = len(tr) * step_s + judging_s
    end_s = (run.val_batches.n + run.test_batches.n) * eval_s + END_S
    epochs = fit_epochs(cfg["minutes"] * 60, time.time() - started, epoch_s, end_s)
    log(f"--minutes {cfg['minutes']:g}: an epoch takes ~{epoch_s:.0f} s here ({len(tr)} steps at {len(x) / step_s:.0f} "
        f"img/s, evaluation {judging_s:.0f} s): {epochs} epoch{'s' * (epochs != 1)} (saved with the run: a "
        f"resume keeps them)")
    return epochs
