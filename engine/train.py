"""The training run: one epoch of steps, the loop with the plateau schedule and early stopping, a checkpoint
every epoch, Ctrl-C / SIGTERM, and the end of a run (report, submission, best checkpoint promoted). What the
run works on (model, optimizer, schedule, scaler, EMA, loss, counters) is its state (state.py); one step of
it is trainstep.py's.

    train(cfg, given, resume)      set_up -> [one_epoch -> end_of_epoch] x epochs -> finish
"""
import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch

import dataloader
import dataset
import models
from engine import (budget, checkpoint, demo_data, folders, inference, loss, optim, promote, recipes, report,
                    runtime, trainstep, whiten)
from engine.errors import UserError, raise_lost_interrupt
from engine.recipes import stops_early
from engine.runtime import log
from engine.state import TrainState, build


@dataclass(eq=False)
class Run:
    """A training run: its state (what its checkpoints hold: state.TrainState) and what it works with besides,
    rebuilt when it resumes: its batches and its folder."""
    state: TrainState
    train_batches: object
    val_batches: object
    holdout_batches: object  # None without --holdout
    test_batches: object
    run_dir: str
    t0: float = 0.0  # when the epoch began
    started: float = 0.0  # when the run (this process) began
    end_s: float = None  # --minutes: the seconds set aside for the end of the run; None: the run is not re-sized
    phase: str = "train"  # "train" or "validate": which ran out of GPU memory, if one does

    @property
    def last(self):
        return os.path.join(self.run_dir, "last.pth")

    @property
    def log_csv(self):
        return os.path.join(self.run_dir, "log.csv")


# ==============================================================================================
# One epoch

class Stop:
    """SIGINT/SIGTERM: finish the current step, save, exit. A second signal exits at once."""
    signal = None

    @classmethod
    def install(cls):
        """Installs the handlers; returns the previous ones (restored when training ends)."""
        def handler(signum, frame):
            if cls.signal is not None:
                raise KeyboardInterrupt
            cls.signal = signum
            log(f"\n{signal.Signals(signum).name}: stopping after this step (press again to quit at once)")
        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    @classmethod
    def exit_code(cls):
        return 130 if cls.signal == signal.SIGINT else 143


class NumericalError(Exception):
    """A loss that became NaN or infinite."""


def train_steps(run, start, stats):
    """Train over one epoch's batches from step `start` (the last epoch of a fractional --epochs: its share of them);
    stats (device tensors) accumulate loss and accuracy. Returns the number of steps done (stops early when
    Stop.signal is set)."""
    s = run.state
    cfg, batches, epoch = s.cfg, run.train_batches, s.epoch + 1
    steps = epoch_steps(run)
    s.model.train()
    done = start
    losses = torch.zeros(steps, device=s.device)  # checked in chunks: no GPU sync per step
    bar = runtime.progress(steps, f"epoch {epoch} train", cfg)
    bar.update(start)
    t0 = time.time()
    for x, y, _ in itertools.islice(batches.batches(s.plan, s.gen, start), steps - start):
        batch_loss, out = trainstep.step(s, x, y)
        losses[done] = batch_loss.detach()
        stats[0] += batch_loss.detach() * len(y)
        stats[1] += (out.argmax(1) == y).sum()
        stats[2] += len(y)
        done += 1
        if done % 50 == 0 or done == steps:
            check_finite(losses[:done], epoch)
            trainstep.follow_steps_taken(s)
            if bar.disable is False:
                bar.set_postfix(loss=f"{stats[0].item() / stats[2].item():.4f}",
                                acc=f"{100 * stats[1].item() / stats[2].item():.1f}%",
                                img_s=f"{(done - start) * cfg['batch_size'] / (time.time() - t0):.0f}")
        bar.update(1)
        if Stop.signal is not None:
            break
    bar.close()
    check_finite(losses[:done], epoch)
    return done


def epoch_steps(run):
    """The steps of the epoch the run is in."""
    return optim.epoch_steps(run.state.cfg["epochs"], run.state.epoch, len(run.train_batches))


def check_finite(losses, epoch):
    """The first step of the epoch whose loss was NaN or infinite, as a NumericalError."""
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        step = bad[0, 0].item()
        raise NumericalError(f"loss became {losses[step].item()} at epoch {epoch}, step {step + 1}")


# ==============================================================================================
# The training run

def train(cfg, given, resume, checked=None):
    """Train one run (new, or resumed from its last.pth) to its end. checked: the data as check_data read it, where
    main.py did so already. Returns the exit code."""
    try:
        return train_run(cfg, given, resume, checked)
    finally:
        folders.release_run_dir()  # another process may resume it now


def train_run(cfg, given, resume, checked):
    run = set_up(cfg, given, resume, checked)
    if isinstance(run, int):  # a resumed run that had nothing left to train
        return run
    cfg = run.state.cfg  # a resumed run's own settings
    # Ctrl-C / SIGTERM are handled here in a single process; under torchrun, torchrun handles them and a
    # run resumes from its last end-of-epoch checkpoint.
    previous_handlers = Stop.install() if runtime.WORLD == 1 else {}
    try:
        while run.state.epoch < cfg["epochs"]:
            stopped = one_epoch(run)
            if stopped is None:
                stopped = end_of_epoch(run)
            if stopped is not None:
                return stopped
            if stops_early(cfg, run.state.bad_epochs):
                log(f"early stop: no better {'held-out' if cfg['select'] == 'holdout' else 'validation'} "
                    f"accuracy for {run.state.bad_epochs} epochs")
                break
    except NumericalError as e:  # on stderr, as every error line of a run (tools/sweep.py shows it as the run's cause)
        there = (f"the last good checkpoint is {run.last}" if os.path.exists(run.last) else
                 "no checkpoint was written yet, as it came in the first epoch")
        print(f"error: {e}; stopped: {there}. Try a lower --lr or --amp off, or --detect-anomaly to find the "
              f"operation", file=sys.stderr)
        return 3
    except torch.OutOfMemoryError:
        out_of_memory(run)
    finally:
        for s, h in previous_handlers.items():
            signal.signal(s, h)
    return finish(run)


def set_up(cfg, given, resume, checked=None):
    """Everything before the first epoch: the run's settings, device, data, model, optimizer, folder and log.
    Returns the Run, or an exit code where a resumed run has nothing left to train."""
    ckpt = path = run_dir = None
    started = time.time()
    if resume:
        ckpt, cfg, path, run_dir, todo = folders.open_resume(cfg, given, resume)
        if os.environ.get("RANK", "0") == "0":  # under torchrun the first process holds it for all
            folders.hold_run_dir(run_dir)
        if todo == "nothing":
            return 0
        if todo == "promote":
            promote.promote_best(cfg, run_dir)
            return 0
        if todo == "finish":
            device = runtime.setup_distributed(cfg)
            if runtime.RANK == 0:
                finish_run(cfg, run_dir, device, runtime.amp_dtype(cfg, device))
            return 0
    device = runtime.setup_distributed(cfg)  # after a resume has restored the run's own settings
    gen = runtime.seed_everything(cfg["seed"], cfg["deterministic"])
    torch.autograd.set_detect_anomaly(cfg["detect_anomaly"])
    if checked is None:  # a resumed run (its data folder is known once its checkpoint is read)
        demo_data.ensure_if_asked(cfg["data_dir"])
    data = checked or dataset.check_data(cfg["data_dir"])  # a new run's was checked before PyTorch was imported
    data_rows = dataset.resume_digests(data)
    if ckpt is not None:
        folders.check_resume_data(ckpt, data_rows, cfg, path)
    tr, va, held, te = load_data(cfg, device, data)
    raw = new_model(cfg, tr, device, resumed=ckpt is not None)
    budget.choose_precision_and_layout(cfg, raw, tr, device, ckpt and ckpt["config"], given if ckpt else ())
    state = build_state(cfg, raw, tr, device, gen, data_rows)
    raise_lost_interrupt()  # its first call imports Triton, where a Ctrl-C can be lost (errors.py): act before a folder
    run_dir = run_dir or claim_run_dir(cfg)
    if runtime.RANK == 0:
        folders.check_output(cfg, run_dir, raw)
    machine_notes(cfg, device)
    run = Run(state, tr, va, held, te, run_dir, started=started)
    if ckpt is not None:
        state.load_state_dict(ckpt, path)
        state.loss_fn = loss.make_loss(cfg, loss.class_weights(cfg, device, state.recall))  # the recall it had
        log(f"resuming {run_dir} at epoch {state.epoch + 1}" + (f", step {state.step + 1}" if state.step else ""))
    if cfg["minutes"] and ckpt is None:  # a new run sized to its time budget: its epochs, then its schedule
        cfg["epochs"], run.end_s = budget.size_epochs(run, started)
        hour = recipes.hour_for_minutes(cfg, given) if cfg["epochs"] >= budget.HOUR_EPOCHS else None
        sized = hour and budget.size_hour(run, started, hour)  # its epochs take longer: fewer fit than short's
        if sized:  # the run becomes --preset hour's, built as that preset builds it
            cfg.update(hour, epochs=sized[0])
            run.end_s = sized[1]
            run.state = state = build_state(cfg, new_model(cfg, tr, device), tr, device, gen, data_rows)
        state.sched = optim.make_scheduler(cfg, state.opt, len(tr))
    if runtime.RANK == 0:
        folders.start_log(run, ckpt is not None)
    return run


def new_model(cfg, tr, device, resumed=False):
    """The model of cfg on `device`, its first layer whitened from the training split where the recipe says so:
    before the optimizer is made, which steps only what is not frozen (a resume loads the filters instead)."""
    raw = build_model(cfg).to(device)
    if cfg["whiten"]:
        whiten.whiten_first_conv(raw, None if resumed else tr)
    return raw


def build_state(cfg, raw, tr, device, gen, data_rows):
    """The run's state at its start: `raw` in the precision and layout chosen for it (budget.py)."""
    return build(cfg, raw, device, runtime.amp_dtype(cfg, device), runtime.channels_last(cfg, device), len(tr),
                 gen=gen, data_rows=data_rows)


def build_model(cfg):
    """The model of cfg['model']; the ensemble's bases are loaded from their checkpoints (and frozen)."""
    if cfg["model"] != "ensemble":
        return models.build_model(cfg["model"], cfg["full_res_width"])
    paths = {name: cfg[f"{name}_ckpt"] or os.path.join(cfg["ckpt_dir"], f"{name}_best.pth")
             for name in ("skip", "three")}
    missing = [f"{name} ({path})" for name, path in paths.items() if not os.path.isfile(path)]
    if missing:
        raise UserError(f"--model ensemble needs trained base checkpoints; missing: {', '.join(missing)}: train them "
                        f"with 'python main.py --model skip' and '--model three', or pass --skip-ckpt/--three-ckpt")
    bases = {}
    for name, path in paths.items():
        ckpt = checkpoint.load(path, expect_model=name)
        bases[name] = models.build_model(name)
        checkpoint.load_weights(bases[name], {**ckpt, "state_dict": checkpoint.eval_state(ckpt)}, path)
    return models.EnsembleCNN(bases["skip"], bases["three"])


def load_data(cfg, device, data):
    """The train, validation, held-out and test batches. Decoded (and so checked) before any run folder exists: a
    bad image costs seconds, not a run; the test split too, though it is predicted only at the end."""
    splits = ["train", "validation", "test"] + (["holdout"] if cfg["holdout"] else [])
    loaders = runtime.first_on_each_machine(lambda: dataloader.loaders_for(cfg, device, splits, "train", data=data))
    tr, va = loaders["train"], loaders["validation"]
    if len(tr) == 0:
        raise UserError(f"{cfg['data_dir']}/train.csv has {tr.n} rows, fewer than one batch of {cfg['batch_size']}: "
                        f"lower --batch-size")
    if "holdout" in loaders:
        log(f"holding out {loaders['holdout'].n} of train.csv's rows (--holdout {cfg['holdout']}, seed "
            f"{cfg['seed']}) to choose the checkpoint on; training on the other {tr.n}")
    return tr, va, loaders.get("holdout"), loaders["test"]


def claim_run_dir(cfg):
    """A new run folder, made by the first process and shared with the others under torchrun."""
    run_dir = folders.new_run_dir(cfg) if runtime.RANK == 0 else None
    if run_dir is not None:
        folders.hold_run_dir(run_dir)
    if runtime.WORLD > 1:
        box = [run_dir]
        torch.distributed.broadcast_object_list(box)
        run_dir = box[0]
    return run_dir


def machine_notes(cfg, device):
    """Settings that pay on a GPU and cost on a CPU, said once."""
    if cfg["compile"] and device.type == "cpu":
        log("note: --compile pays on a GPU; on a CPU it trained ThreeCNN slower than without (docs/performance.md)")
    if cfg["preset"] == "fast" and device.type == "cpu":
        log("note: --preset fast pays on a GPU; on a CPU ThreeCNN trained slower per image at batch 256 than at the "
            "report's 16 (docs/performance.md), so --preset report is faster here")


def one_epoch(run):
    """Train the epoch's steps (from where a resumed run stopped). Interrupted mid-epoch: save where it is and
    return the exit code; else None."""
    s = run.state
    run.t0 = time.time()
    if s.step == 0:
        s.plan, s.partial = run.train_batches.plan(s.gen), torch.zeros(3, device=s.device)
    run.phase = "train"  # which of the two ran out of memory, if one does
    s.step = train_steps(run, s.step, s.partial)
    if Stop.signal is None or s.step == epoch_steps(run):
        return None
    if runtime.RANK == 0:
        folders.save_state(run, run.last)
        log(f"saved {run.last} (epoch {s.epoch + 1}, step {s.step}).\nresume with: "
            f"python main.py --resume {run.run_dir}")
    return Stop.exit_code()


def epoch_mark(cfg, improved, bad_epochs):
    """What an epoch's line says about selection: under --select last nothing (best.pth is simply the latest
    weights, so a '*best*' beside a lower accuracy than the epoch before would mislead), else *best* or the
    count towards early stopping."""
    if cfg["select"] == "last":
        return ""
    of = "" if cfg["early_stop"] is None else f"/{cfg['early_stop']}"
    return "  *best*" if improved else f"  ({bad_epochs}{of} without gain)"


def end_of_epoch(run):
    """Validate, step the schedule, count epochs without gain, save best.pth and last.pth, log the epoch.
    Returns the exit code when a signal asked to stop, else None."""
    s = run.state
    cfg = s.cfg
    s.epoch, s.step = s.epoch + 1, 0
    if runtime.WORLD > 1:
        torch.distributed.all_reduce(s.partial)
    run.phase = "validate"
    judging_from = time.time()
    eval_model = s.ema.module if s.ema is not None else s.raw
    val_loss, val_acc, s.recall = inference.evaluate_split(eval_model, run.val_batches, cfg, s.device, s.amp)
    held_acc = ""
    if run.holdout_batches is not None:  # the selection metric, and the recall --class-weights auto follows
        _, held_acc, s.recall = inference.evaluate_split(eval_model, run.holdout_batches, cfg, s.device, s.amp)
    judging_s = time.time() - judging_from
    score = held_acc if cfg["select"] == "holdout" else val_acc  # what chooses best.pth (not used by 'last')
    lr = s.opt.param_groups[0]["lr"]
    if isinstance(s.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        s.sched.step(score)  # the report's schedule: on validation accuracy, mode max
    elif cfg["scheduler"] not in optim.PER_STEP_SCHEDULES:  # those stepped after every step (train_steps)
        s.sched.step()
    if cfg["class_weights"] == "auto":
        s.loss_fn = loss.make_loss(cfg, loss.class_weights(cfg, s.device, s.recall))
    improved = cfg["select"] == "last" or score > s.best_acc  # last: best.pth is always the latest weights
    if improved:
        s.best_acc, s.best_epoch, s.bad_epochs = score, s.epoch, 0
    else:
        s.bad_epochs += 1
    n = s.partial[2].item()
    row = dict(epoch=s.epoch, lr=lr, train_loss=s.partial[0].item() / n, train_acc=s.partial[1].item() / n,
               val_loss=val_loss, val_acc=val_acc, holdout_acc=held_acc, seconds=time.time() - run.t0)
    resized = (s.epoch == 1 and run.end_s is not None  # sized by --minutes in this process, now from a real epoch
               and budget.resize_after_first_epoch(run, row["seconds"], judging_s))
    s.finished = stops_early(cfg, s.bad_epochs) or s.epoch >= cfg["epochs"]
    if runtime.RANK == 0:
        if resized:
            folders.write_config(run)
        if improved:
            folders.save_state(run, os.path.join(run.run_dir, "best.pth"))
        folders.save_state(run, run.last)
        folders.write(run, folders.append_log, run.log_csv, row)
        log(f"epoch {s.epoch:3d}/{cfg['epochs']}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:6.2f}%"
            f"  val loss {val_loss:.4f} acc {100 * val_acc:6.2f}%" + (f"  holdout acc {100 * held_acc:6.2f}%"
                                                                        if held_acc != "" else "")
            + f"  lr {lr:.2e}  {row['seconds']:.1f}s"
            + epoch_mark(cfg, improved, s.bad_epochs)
            + (f"  peak GPU memory {torch.cuda.max_memory_allocated(s.device) / 2**20:,.0f} MiB"
               if s.device.type == "cuda" else ""))
    if Stop.signal is not None:
        log(f"stopped after epoch {s.epoch}; resume with: python main.py --resume {run.run_dir}")
        return Stop.exit_code()
    return None


def out_of_memory(run):
    """The GPU ran out of memory: one line saying which batch to lower, and how to go on."""
    if run.phase == "train":
        raise UserError(f"the GPU ran out of memory at batch size {run.state.cfg['batch_size']}: start again with "
                        f"--batch-size {max(1, run.state.cfg['batch_size'] // 2)}")
    va = run.val_batches
    if va.batch_size == 1:
        raise  # not the batch: main() names the other causes
    # The evaluation batch may change on resume: the run goes on from its last saved epoch.
    flag = f"--eval-batch-size {va.batch_size // 2}"
    raise UserError(f"the GPU ran out of memory validating at batch {va.batch_size}: " +
                    (f"continue with python main.py --resume {run.run_dir} {flag}" if os.path.exists(run.last)
                     else f"start again with {flag}"))


def finish(run):
    """Training is over: mark last.pth finished, judge the best checkpoint, write the submission."""
    if not run.state.finished and runtime.RANK == 0:  # ran out of epochs exactly at a boundary
        run.state.finished = True
        folders.save_state(run, run.last)
    if runtime.RANK == 0:  # the splits already in memory, unless each process holds only its share (torchrun)
        batches = {"validation": run.val_batches, "test": run.test_batches} if runtime.WORLD == 1 else None
        finish_run(run.state.cfg, run.run_dir, run.state.device, run.state.amp, batches)
    if runtime.WORLD > 1:
        torch.distributed.barrier()
    return 0


def finish_run(cfg, run_dir, device, amp, batches=None):
    """After training: the best checkpoint, loaded once, judged on validation (the figure is saved in it) and
    predicting test, then kept where users find it. batches: the validation and test loaders, when at hand."""
    best = os.path.join(run_dir, "best.pth")
    ckpt = checkpoint.load(best)
    model = inference.model_for_eval(ckpt, best, cfg, device)
    if batches is None:
        batches = dataloader.loaders_for(cfg, device, ["validation", "test"], sharded=False)
    va, te = batches["validation"], batches["test"]
    probs, pos, _, _ = inference.predict_probs(model, va, cfg, device, amp, cfg["tta"], "validate")
    rep = report.write_report(probs, pos, va, run_dir, f"{cfg['model']}: best checkpoint of {run_dir}", [best])
    ckpt = promote.write_validation_figure(best, ckpt, rep["accuracy"])
    probs, pos, _, _ = inference.predict_probs(model, te, cfg, device, amp, cfg["tta"], "predict")
    report.write_submission(probs, pos, te, os.path.join(run_dir, "submission.csv"))
    promote.promote_best(cfg, run_dir, ckpt)
    report.draw(report.plot_curves, os.path.join(run_dir, "log.csv"), os.path.join(run_dir, "curves.png"))
