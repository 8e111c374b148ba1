"""The training run: one epoch of steps, the loop with the plateau schedule and early stopping, a checkpoint
every epoch, Ctrl-C / SIGTERM, and the end of a run (report, submission, best checkpoint promoted). What a
step is made of (model, loss, optimizer, schedule, batch mixing) is in optim.py.

    train(cfg, given, resume)      set_up -> [one_epoch -> end_of_epoch] x epochs -> finish
"""
import os
import signal
import sys
import time
from types import SimpleNamespace

import torch

from engine import budget
from engine import checkpoint
import dataloader
import dataset
from engine import evaluate
import models
from engine import optim
from engine import report
from engine import runs
from engine import runtime
from engine import trainstep
from engine.errors import UserError, raise_lost_interrupt
from engine.runtime import log

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
    """Train over one epoch's batches from step `start`; stats (device tensors) accumulate loss and accuracy.
    Returns the number of steps done (stops early when Stop.signal is set)."""
    cfg, batches, epoch = run.cfg, run.train_batches, run.epoch + 1
    run.model.train()
    done = start
    losses = torch.zeros(len(batches), device=run.device)  # checked in chunks: no GPU sync per step
    bar = runtime.progress(len(batches), f"epoch {epoch} train", cfg)
    bar.update(start)
    t0 = time.time()
    for x, y, _ in batches.batches(run.plan, run.gen, start):
        loss, out = trainstep.step(run, x, y)
        losses[done] = loss.detach()
        stats[0] += loss.detach() * len(y)
        stats[1] += (out.argmax(1) == y).sum()
        stats[2] += len(y)
        done += 1
        if done % 50 == 0 or done == len(batches):
            check_finite(losses[:done], epoch)
            trainstep.follow_steps_taken(run)
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
        runs.release_run_dir()  # another process may resume it now


def train_run(cfg, given, resume, checked):
    run = set_up(cfg, given, resume, checked)
    if isinstance(run, int):  # a resumed run that had nothing left to train
        return run
    # Ctrl-C / SIGTERM are handled here in a single process; under torchrun, torchrun handles them and a
    # run resumes from its last end-of-epoch checkpoint.
    previous_handlers = Stop.install() if runtime.WORLD == 1 else {}
    try:
        while run.epoch < run.cfg["epochs"]:
            stopped = one_epoch(run)
            if stopped is None:
                stopped = end_of_epoch(run)
            if stopped is not None:
                return stopped
            if run.bad_epochs >= run.cfg["early_stop"]:
                log(f"early stop: no better {'held-out' if run.cfg['select'] == 'holdout' else 'validation'} "
                    f"accuracy for {run.bad_epochs} epochs")
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
        ckpt, cfg, path, run_dir, todo = runs.open_resume(cfg, given, resume)
        if os.environ.get("RANK", "0") == "0":  # under torchrun the first process holds it for all
            runs.hold_run_dir(run_dir)
        if todo == "nothing":
            return 0
        if todo == "promote":
            promote_best(cfg, run_dir)
            return 0
        if todo == "finish":
            device = runtime.setup_distributed(cfg)
            if runtime.RANK == 0:
                finish_run(cfg, run_dir, device, runtime.amp_dtype(cfg, device))
            return 0
    device = runtime.setup_distributed(cfg)  # after a resume has restored the run's own settings
    gen = runtime.seed_everything(cfg["seed"], cfg["deterministic"])
    torch.autograd.set_detect_anomaly(cfg["detect_anomaly"])
    data = checked or dataset.check_data(cfg["data_dir"])  # a new run's was checked before PyTorch was imported
    data_rows = dataset.resume_digests(data)
    if ckpt is not None:
        runs.check_resume_data(ckpt, data_rows, cfg, path)
    tr, va, held, te = load_data(cfg, device, data)
    raw = models.build_for_run(cfg).to(device)
    budget.choose_precision_and_layout(cfg, raw, tr, device, ckpt and ckpt["config"], given if ckpt else ())
    state = trainstep.build_state(cfg, raw, device, runtime.amp_dtype(cfg, device), runtime.channels_last(cfg, device),
                                  len(tr))
    raise_lost_interrupt()  # its first call imports Triton, where a Ctrl-C can be lost (errors.py): act before a folder
    run_dir = run_dir or claim_run_dir(cfg)
    if runtime.RANK == 0:
        runs.check_output(cfg, run_dir, raw)
    machine_notes(cfg, device)
    run = SimpleNamespace(
        **vars(state), gen=gen, data_rows=data_rows, train_batches=tr, val_batches=va, holdout_batches=held,
        test_batches=te, run_dir=run_dir, last=os.path.join(run_dir, "last.pth"),
        log_csv=os.path.join(run_dir, "log.csv"),
        **runs.COUNTERS, partial=torch.zeros(3, device=device), finished=False)  # where the run stands
    if ckpt is not None:
        runs.restore(run, ckpt, path)
    run.loss_fn = optim.make_loss(cfg, optim.class_weights(cfg, device, run.recall))
    if cfg["minutes"] and ckpt is None:  # a new run sized to its time budget: its epochs, then its schedule
        cfg["epochs"] = budget.size_epochs(run, started)
        run.sched = optim.make_scheduler(cfg, run.opt, len(tr))
    if runtime.RANK == 0:
        runs.start_log(run, ckpt is not None)
    return run


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
    run_dir = runs.new_run_dir(cfg) if runtime.RANK == 0 else None
    if run_dir is not None:
        runs.hold_run_dir(run_dir)
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
    run.t0 = time.time()
    if run.step == 0:
        run.plan, run.partial = run.train_batches.plan(run.gen), torch.zeros(3, device=run.device)
    run.phase = "train"  # which of the two ran out of memory, if one does
    run.step = train_steps(run, run.step, run.partial)
    if Stop.signal is None or run.step == len(run.train_batches):
        return None
    if runtime.RANK == 0:
        runs.save_state(run, run.last)
        log(f"saved {run.last} (epoch {run.epoch + 1}, step {run.step}).\nresume with: "
            f"python main.py --resume {run.run_dir}")
    return Stop.exit_code()


def epoch_mark(cfg, improved, bad_epochs):
    """What an epoch's line says about selection: under --select last nothing (best.pth is simply the latest
    weights, so a '*best*' beside a lower accuracy than the epoch before would mislead), else *best* or the
    count towards early stopping."""
    if cfg["select"] == "last":
        return ""
    return "  *best*" if improved else f"  ({bad_epochs}/{cfg['early_stop']} without gain)"


def end_of_epoch(run):
    """Validate, step the schedule, count epochs without gain, save best.pth and last.pth, log the epoch.
    Returns the exit code when a signal asked to stop, else None."""
    cfg = run.cfg
    run.epoch, run.step = run.epoch + 1, 0
    if runtime.WORLD > 1:
        torch.distributed.all_reduce(run.partial)
    run.phase = "validate"
    eval_model = run.ema.module if run.ema is not None else run.raw
    val_loss, val_acc, run.recall = evaluate.evaluate_split(eval_model, run.val_batches, cfg, run.device, run.amp)
    held_acc = ""
    if run.holdout_batches is not None:  # the selection metric, and the recall --class-weights auto follows
        _, held_acc, run.recall = evaluate.evaluate_split(eval_model, run.holdout_batches, cfg, run.device, run.amp)
    score = held_acc if cfg["select"] == "holdout" else val_acc  # what chooses best.pth (not used by 'last')
    lr = run.opt.param_groups[0]["lr"]
    if isinstance(run.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.sched.step(score)  # the report's schedule: on validation accuracy, mode max
    elif cfg["scheduler"] not in optim.PER_STEP_SCHEDULES:  # those stepped after every step (train_steps)
        run.sched.step()
    if cfg["class_weights"] == "auto":
        run.loss_fn = optim.make_loss(cfg, optim.class_weights(cfg, run.device, run.recall))
    improved = cfg["select"] == "last" or score > run.best_acc  # last: best.pth is always the latest weights
    if improved:
        run.best_acc, run.best_epoch, run.bad_epochs = score, run.epoch, 0
    else:
        run.bad_epochs += 1
    n = run.partial[2].item()
    row = dict(epoch=run.epoch, lr=lr, train_loss=run.partial[0].item() / n, train_acc=run.partial[1].item() / n,
               val_loss=val_loss, val_acc=val_acc, holdout_acc=held_acc, seconds=time.time() - run.t0)
    run.finished = run.bad_epochs >= cfg["early_stop"] or run.epoch >= cfg["epochs"]
    if runtime.RANK == 0:
        if improved:
            runs.save_state(run, os.path.join(run.run_dir, "best.pth"))
        runs.save_state(run, run.last, run.finished)
        runs.write(run, runs.append_log, run.log_csv, row)
        log(f"epoch {run.epoch:3d}/{cfg['epochs']}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:6.2f}%"
            f"  val loss {val_loss:.4f} acc {100 * val_acc:6.2f}%" + (f"  holdout acc {100 * held_acc:6.2f}%"
                                                                        if held_acc != "" else "")
            + f"  lr {lr:.2e}  {row['seconds']:.1f}s"
            + epoch_mark(cfg, improved, run.bad_epochs)
            + (f"  peak GPU memory {torch.cuda.max_memory_allocated(run.device) / 2**20:,.0f} MiB"
               if run.device.type == "cuda" else ""))
    if Stop.signal is not None:
        log(f"stopped after epoch {run.epoch}; resume with: python main.py --resume {run.run_dir}")
        return Stop.exit_code()
    return None


def out_of_memory(run):
    """The GPU ran out of memory: one line saying which batch to lower, and how to go on."""
    if run.phase == "train":
        raise UserError(f"the GPU ran out of memory at batch size {run.cfg['batch_size']}: start again with "
                        f"--batch-size {max(1, run.cfg['batch_size'] // 2)}")
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
    if not run.finished and runtime.RANK == 0:  # ran out of epochs exactly at a boundary
        runs.save_state(run, run.last, True)
    if runtime.RANK == 0:  # the splits already in memory, unless each process holds only its share (torchrun)
        batches = {"validation": run.val_batches, "test": run.test_batches} if runtime.WORLD == 1 else None
        finish_run(run.cfg, run.run_dir, run.device, run.amp, batches)
    if runtime.WORLD > 1:
        torch.distributed.barrier()
    return 0


def finish_run(cfg, run_dir, device, amp, batches=None):
    """After training: the best checkpoint, loaded once, judged on validation (the figure is saved in it) and
    predicting test, then kept where users find it. batches: the validation and test loaders, when at hand."""
    best = os.path.join(run_dir, "best.pth")
    ckpt = checkpoint.load(best)
    model = evaluate.model_for_eval(ckpt, best, cfg, device)
    if batches is None:
        batches = dataloader.loaders_for(cfg, device, ["validation", "test"], sharded=False)
    va, te = batches["validation"], batches["test"]
    probs, pos, _, _ = evaluate.predict_probs(model, va, cfg, device, amp, cfg["tta"], "validate")
    rep = evaluate.write_report(probs, pos, va, run_dir, f"{cfg['model']}: best checkpoint of {run_dir}", [best])
    ckpt = runs.write_validation_figure(best, ckpt, rep["accuracy"])
    probs, pos, _, _ = evaluate.predict_probs(model, te, cfg, device, amp, cfg["tta"], "predict")
    evaluate.write_submission(probs, pos, te, os.path.join(run_dir, "submission.csv"))
    promote_best(cfg, run_dir, ckpt)
    report.draw(report.plot_curves, os.path.join(run_dir, "log.csv"), os.path.join(run_dir, "curves.png"))


def promote_best(cfg, run_dir, ckpt=None):
    """The run's best compared with CKPT_DIR's (runs.promote), and that it was, noted in the run folder."""
    line = runs.promote(os.path.join(run_dir, "best.pth"), cfg, ckpt)
    checkpoint.atomic_write_text(os.path.join(run_dir, runs.PROMOTED), line + "\n")
