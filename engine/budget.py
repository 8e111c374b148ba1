"""Timing a run's own training step on this machine before it starts: the precision and memory layout that
--amp auto and --channels-last auto choose, the epochs that --minutes N fits, and whether --model res trains
--preset hour's recipe in them (where 7 of its epochs fit). Each timing steps a copy of the
model built as the run builds it (state.build), so the run's weights and random state are untouched;
each choice is saved with the run's settings, so a resume on the same machine keeps it.

    precision, layout: the fastest training step among the candidates the device runs natively
    epochs = (N minutes x MARGIN - setting up - the end of the run) / (an epoch's steps + its evaluations)
    then, after the first epoch: 1 + (N minutes - time so far - the end) x MEASURED_MARGIN / the first epoch's seconds
    (whole epochs, then the steps of one more that fit beside its evaluations: a fractional --epochs, fit_epochs)
    recipe: --preset hour's where its epochs, so counted, are HOUR_EPOCHS or more; else the run's own
"""
import copy
import math
import time

import torch

import dataloader
import models
from engine import optim, runtime, trainstep, whiten
from engine.errors import UserError
from engine.runtime import log
from engine.state import build

# What the end of a run takes besides predicting (saving, reports, pictures): a few seconds measured on a 2-core
# CPU; and the share of the budget planned for, so that a machine that slows down a little still ends in time.
END_S = 20
MARGIN = 0.92
# Once a real epoch has run, only the time still to come is uncertain: the share of it planned for. On a 2-core
# CPU with AVX512-BF16 the later epochs of seven whitened ResCNN runs (of 6 and 12 epochs, in docs/results.csv)
# averaged 0.97-1.04 times their first, so 0.95 of the time left ends in time. With MARGIN on the whole budget
# instead, --minutes 15 kept 5 epochs of ~131 s and ended after 11.8 minutes, where 6 take ~14.0 (an estimate:
# that run's minutes plus one more of its epochs).
MEASURED_MARGIN = 0.95
TIMED_S = 10  # time at most this long in all (after 2 untimed steps), in WINDOWS windows
WINDOWS = 3  # the fastest window counts: whatever else runs on the machine only ever slows a window down (a
# sizing just after a boot timed 67 img/s in one 10 s window; its epochs then trained at ~90 img/s)


def seconds_each(fn, steps):
    """Seconds per call of fn(): 2 untimed calls (first-call set-up), then WINDOWS windows of up to `steps` calls or
    TIMED_S / WINDOWS seconds each (at least one call); the fastest window's seconds per call. Not
    torch.utils.benchmark.Timer (tools/bench.py uses it): a run's timing must stop after TIMED_S seconds however
    slow the step, and count its fastest window, where Timer runs a set number of calls and averages them."""
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


def forked_rng(device):
    """The global random generators (and the GPU's), restored when the block ends: a timing draws nothing the run
    would have drawn (dropout, a model's initialisation)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def planned_s(cfg, started, end_s):
    """The seconds of --minutes planned for epochs: MARGIN of the budget, less the time so far and the end's."""
    return cfg["minutes"] * 60 * MARGIN - (time.time() - started) - end_s


def fit_epochs(left_s, epoch_s, at_least=1, judging_s=0.0, steps=1):
    """The epochs of epoch_s seconds that fit in left_s seconds (at least `at_least`): whole epochs, then as many
    of one more epoch's `steps` steps as fit beside that epoch's evaluation (judging_s of epoch_s): a fractional
    --epochs (optim.epoch_steps), rounded to 4 decimals (the step it names is the same)."""
    whole = math.floor(left_s / epoch_s)
    rest = left_s - whole * epoch_s - judging_s
    part = min(steps - 1, math.floor(rest * steps / (epoch_s - judging_s))) if rest > 0 else 0
    return max(at_least, whole if part == 0 else round(whole + part / steps, 4))


# ==============================================================================================
# --amp auto, --channels-last auto

TUNE_WARMUP, TUNE_STEPS = 1, 2  # a timed warm-up step (first-call set-up), then timed ones: the fastest counts
SLOW = 5  # a candidate whose warm-up step alone took this many times the best step so far is not timed further
# On a GPU the first step of each candidate also runs cuDNN's search for its kernels (cudnn.benchmark): seconds,
# where a step then takes milliseconds. That step is left untimed there, or the first candidate always wins: on an
# H200 (2026-12-04) every later candidate's warm-up step took 4.8-7.7 s against the first's 0.04-0.05 s steps, so
# none of them was timed further (SLOW) and --amp auto never compared what it says it compares.


def choose_precision_and_layout(cfg, raw, batches, device, saved=None, given=()):
    """Sets cfg["chosen"]: the precision and layout the run trains in here, where they were chosen and the
    timings that chose them. For --amp auto / --channels-last auto, a few training steps of the run's own model
    and batch are timed in each candidate the device runs natively (runtime.native_precisions; NCHW and
    channels_last) and the fastest is taken. A resumed run (saved: its settings) keeps its choice on the machine
    that made it and chooses anew elsewhere, where a precision it was given that is not native there is dropped
    for auto unless given again now (`given`: the flags of this command). A change is said in one line."""
    here = runtime.machine(device)
    before = (saved or {}).get("chosen")
    if (before and before["on"] != here and "amp" not in given
            and cfg["amp"] not in ("auto", *runtime.native_precisions(device))):
        log(f"note: this run was given --amp {cfg['amp']}, which {here} only emulates: it goes on as --amp auto "
            f"chooses (resume with --amp {cfg['amp']} to keep it)")
        cfg["amp"] = "auto"
    runtime.check_precision(cfg["amp"], device)
    amps = runtime.native_precisions(device) if cfg["amp"] == "auto" else [cfg["amp"]]
    layouts = [False, True] if cfg["channels_last"] == "auto" else [bool(cfg["channels_last"])]
    if before and before["on"] == here and before["amp"] in amps and before["channels_last"] in layouts:
        chosen = before
    elif len(amps) * len(layouts) == 1 or runtime.WORLD > 1:  # under torchrun: the first candidates, untimed
        chosen = dict(amp=amps[0], channels_last=layouts[-1], on=here, seconds=None)
    else:
        with forked_rng(device):
            seconds = time_candidates(cfg, raw, batches, device, [(a, cl) for a in amps for cl in layouts])
        (amp, cl), _ = min(seconds.items(), key=lambda kv: kv[1])
        chosen = dict(amp=amp, channels_last=cl, on=here, seconds={describe(a, c): s for (a, c), s in seconds.items()})
        asked = " / ".join(f for f, v in (("--amp", cfg["amp"]), ("--channels-last", cfg["channels_last"])) if v == "auto")
        log(f"{asked} auto: a training step here takes " + ", ".join(
            f"{k} {v:.3g} s" if v < math.inf else f"{k} out of memory" for k, v in chosen["seconds"].items())
            + f": training in {describe(amp, cl)} (saved with the run)")
    if before and (before["amp"], before["channels_last"]) != (chosen["amp"], chosen["channels_last"]):
        log(f"this run trained in {describe(before['amp'], before['channels_last'])} on {before['on']}; it goes on in "
            f"{describe(chosen['amp'], chosen['channels_last'])} on {here}: a resume continues bit for bit only in "
            f"the precision it was saved in")
    cfg["chosen"] = chosen


def describe(amp, channels_last):
    return f"{runtime.PRECISION_NAMES[amp]} {'channels_last' if channels_last else 'NCHW'}"


def time_candidates(cfg, raw, batches, device, candidates):
    """Seconds of a training step (the fastest of TUNE_STEPS, after TUNE_WARMUP; on a GPU after an untimed first
    step too) in each (precision, layout), on a copy of the model and one batch of the run's own size; not compiled
    (compiling each would take minutes)."""
    gen = torch.Generator().manual_seed(0)
    x, y, _ = next(batches.batches(batches.plan(gen), gen))
    seconds = {}
    for amp, cl in candidates:
        trial = build(cfg, copy.deepcopy(raw).train(), device, runtime.DTYPES[amp], cl, len(batches), compile=False,
                      ddp=False)
        try:
            if device.type == "cuda":
                trainstep.step(trial, x, y)  # cuDNN's search for this candidate's kernels, untimed (above)
            times = [timed_step(trial, x, y) for _ in range(TUNE_WARMUP)]
            if not seconds or times[-1] < SLOW * min(seconds.values()):
                times = [timed_step(trial, x, y) for _ in range(TUNE_STEPS)]
            seconds[amp, cl] = min(times)
        except torch.OutOfMemoryError:  # a candidate that does not fit is not one (fp32 needs more than fp16)
            seconds[amp, cl] = math.inf
        del trial
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return seconds


def timed_step(state, x, y):
    t0 = time.perf_counter()
    trainstep.step(state, x, y)
    runtime.sync(state.device)
    return time.perf_counter() - t0


# ==============================================================================================
# --minutes

def size_epochs(run, started):
    """Times the run's own training step, input included, and an evaluation batch here, and returns the epochs
    that fit in --minutes and the seconds the end of the run will take (resize_after_first_epoch sets them aside
    again). The step runs on a state built as the run's (its own GradScaler, compiled where the
    run is), on a copy of the model, so the run's weights, scaler and random state are untouched."""
    if runtime.WORLD > 1:
        raise UserError("--minutes sizes a run of one process: under torchrun give --epochs")
    # Dropout draws from the global generators: forked, so the run draws what it would have without this timing
    with forked_rng(run.state.device):
        return _size_epochs(run, started)


def _size_epochs(run, started):
    cfg = run.state.cfg
    epoch_s, end_s, step_s, judging_s = epoch_seconds(run, cfg, run.state.raw)
    steps = len(run.train_batches)
    epochs = fit_epochs(planned_s(cfg, started, end_s), epoch_s, 1, judging_s, steps)
    log(f"--minutes {cfg['minutes']:g}: an epoch takes ~{epoch_s:.0f} s here ({steps} steps at "
        f"{cfg['batch_size'] / step_s:.0f} img/s, evaluation {judging_s:.0f} s): {epochs:g} epoch{'s' * (epochs != 1)} "
        f"(saved with the run: a resume keeps them)")
    return epochs, end_s


def epoch_seconds(run, cfg, raw):
    """An epoch's seconds (its steps and its evaluations), the end's (predicting validation and test, saving), a
    step's and the evaluations', for a run of `raw` under `cfg` with `run`'s data, precision and layout: timed on
    a copy."""
    s = run.state
    tr, device = run.train_batches, s.device
    trial = build(cfg, copy.deepcopy(raw).train(), device, s.amp, s.channels_last, len(tr), s.recall)
    gen = torch.Generator().manual_seed(0)
    batches = iter(())

    def train_step():  # the loader's next batch (augmented as in the run), then the step
        nonlocal batches
        try:
            x, y, _ = next(batches)
        except StopIteration:
            batches = tr.batches(tr.plan(gen), gen)
            x, y, _ = next(batches)
        trainstep.step(trial, x, y)
        runtime.sync(device)
    step_s = seconds_each(train_step, 8)
    ex, _, _ = next(run.val_batches.batches(run.val_batches.plan()))
    ex = ex.contiguous(memory_format=torch.channels_last) if s.channels_last else ex
    # the views judged at the end (and each epoch unless --select last), as inference makes them
    views = dataloader.tta_views(ex, cfg["tta_views"]) if cfg["tta"] else [ex]
    trial.raw.eval()

    @torch.inference_mode()
    def evaluate():
        with torch.autocast(device.type, dtype=s.amp, enabled=s.amp is not None):
            for v in views:
                trial.model(v)
        runtime.sync(device)
    eval_s = seconds_each(evaluate, 4) / len(ex)  # per image, all views
    judged = run.val_batches.n + (run.holdout_batches.n if run.holdout_batches is not None else 0)
    judging_s = judged * eval_s / (len(views) if cfg["select"] == "last" else 1)  # each epoch's, TTA where it decides
    epoch_s = len(tr) * step_s + judging_s
    end_s = (run.val_batches.n + run.test_batches.n) * eval_s + END_S
    return epoch_s, end_s, step_s, judging_s


# --model res --minutes N, its recipe not named: where 7 or more of --preset hour's epochs fit in N minutes here,
# they are the better use of the time. On held-out rows (docs/screening.md, the fifth split) hour's 12 epochs scored
# 0.80 point above short's 12, and hour's 7, which take about the time of short's 14, scored 0.48 above short's 12
# (its rule asked 0.4), where short's 24 had scored only 0.16 above its 12 (third split). Validation confirmed the
# 12 afterwards: hour 96.16% (three seeds), short fitted to 60 minutes 95.20% (23 epochs, one seed). Fewer than 7
# of hour's epochs were never measured, so a budget that holds fewer keeps 'short'.
HOUR_EPOCHS = 7


def size_hour(run, started, hour):
    """--minutes for the hour's recipe (`hour`: the run's settings with --preset hour's): its step and evaluation
    timed on a model of its own (its first layer frozen as the run's, not computed: the timing needs its shape,
    not its filters). Returns (epochs, end's seconds) where HOUR_EPOCHS or more fit, else None."""
    with forked_rng(run.state.device):
        raw = models.build_model("res", hour["full_res_width"]).to(run.state.device)
        if hour["whiten"]:
            whiten.whiten_first_conv(raw)
        epoch_s, end_s, _, judging_s = epoch_seconds(run, hour, raw)
    epochs = fit_epochs(planned_s(hour, started, end_s), epoch_s, 0, judging_s, len(run.train_batches))
    fits = epochs >= HOUR_EPOCHS
    log(f"--minutes {hour['minutes']:g}: --preset hour (the best single model) takes ~{epoch_s:.0f} s an epoch "
        f"here: {epochs:g} of its epochs fit, " + ("so the run trains it instead" if fits else
                                                  f"fewer than {HOUR_EPOCHS}, so the run keeps --preset short"))
    return (epochs, end_s) if fits else None


# Schedules whose first epoch does not depend on the number of epochs: the rates of a run re-sized after it are
# those of a run given the new number from the start (optim.make_scheduler).
def schedule_waits_for_the_first_epoch(cfg):
    return cfg["scheduler"] == "plateau" or (cfg["scheduler"] in ("linear", "warmup_cosine") and cfg["warmup"] >= 1)


def resize_after_first_epoch(run, epoch_s, judging_s):
    """--minutes, once the first epoch has run: the epochs are sized again from what it took (training and its
    evaluations, `epoch_s`, judging_s of it the evaluations), where the schedule has not yet depended on their
    number (a warmup of an epoch or more, or the plateau schedule). Why: the timing before the start steps a fresh
    copy of the model for a few seconds, and on a 2-core CPU with AVX512-BF16 it read ResCNN's whitened step ~8%
    slower than the epochs then ran (131 s an epoch, where the epochs then took 118-125 s), so --minutes 15 fitted
    5 epochs where 6 take 13 minutes. A real epoch is the better measure, and the time left after it is planned
    with MEASURED_MARGIN. The schedule is rebuilt over the new number and continues from its step, so the run is
    the one --epochs N would have made. Returns whether the number changed."""
    s = run.state
    cfg = s.cfg
    if not schedule_waits_for_the_first_epoch(cfg):
        return False
    left_s = cfg["minutes"] * 60 - (time.time() - run.started) - run.end_s
    epochs = round(1 + fit_epochs(left_s * MEASURED_MARGIN, epoch_s, 0, judging_s, len(run.train_batches)), 4)
    if epochs == cfg["epochs"]:
        return False
    log(f"--minutes {cfg['minutes']:g}: the first epoch took {epoch_s:.0f} s: {epochs:g} epochs in all, not "
        f"{cfg['epochs']:g} (saved with the run)")
    cfg["epochs"] = epochs
    if cfg["scheduler"] != "plateau":  # the plateau schedule does not know the number of epochs
        saved = s.sched.state_dict()
        s.sched = optim.make_scheduler(cfg, s.opt, len(run.train_batches))
        s.sched.load_state_dict(saved)
        optim.follow_epochs(s.sched, s.opt, cfg)
    return True
