"""Train, evaluate and predict the report's models on the UniBuc deepfake data: the command line.

    python main.py --model skip                     train with the report's recipe, report, write a submission
    python main.py --model three --demo             the same on a synthetic demo set (no download needed)
    python main.py --model three --preset fast      ThreeCNN at batch 256, for a GPU (16x the report's batch)
    python main.py --model res                      ResCNN (ours) with its recipe; nothing chosen on validation
    python main.py --model res --minutes 30         the same, sized to what fits in 30 minutes on this machine
    python main.py --model res --preset hour        the recipe chosen for an hour on a 2-core CPU
    python main.py --evaluate CKPT                  judge a checkpoint on validation
    python main.py --predict CKPT                   write a submission from a checkpoint
    python main.py --analyze CKPT                   error analysis: confusions, worst images, class samples
    python main.py --compare [RUN ...]              a table of finished runs
    python main.py --model skip --summary           the model's layer table
    torchrun --nproc_per_node=2 main.py --model three    the same training on 2 GPUs (or CPU processes)

This file holds the parser, which command runs, and the one place where a user error becomes one line on
stderr and exit 2. The engine is the package engine/ (docs/code.md): the recipes in recipes.py, the training
loop in train.py, the other commands in commands.py. PyTorch is imported only once the flags and the data
folder have been checked, so a typo costs a second, not the import.
"""
import argparse
import gc
import signal
import sys

from engine.errors import DISK_ERRORS, UserError, note_interrupts, raise_lost_interrupt
from engine.recipes import DEMO_DIR, DEMO_EPOCHS, PRESETS, RECIPES, resolve_config

# ==============================================================================================
# Command line

def build_parser():
    usage = __doc__.split("\n\nThis file")[0]  # the examples; the rest speaks of the code, not of its use
    p = argparse.ArgumentParser(description=usage, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    a = p.add_argument
    g = p.add_argument_group("what to do (default: train)")
    g.add_argument("--evaluate", metavar="CKPT", help="evaluate a checkpoint on validation, no training")
    g.add_argument("--predict", metavar="CKPT", help="write a submission CSV from a checkpoint, no training")
    g.add_argument("--analyze", metavar="CKPT", help="error analysis of a checkpoint on validation")
    g.add_argument("--compare", metavar="RUN", nargs="*", help="table of finished runs (default: all under --out-dir)")
    g.add_argument("--ensemble-of", metavar="CKPT", nargs="+", help="soft-vote these checkpoints (with --evaluate "
                   "or --predict given as 'vote'): e.g. --evaluate vote --ensemble-of a.pth b.pth")
    g.add_argument("--summary", action="store_true", help="print the model's layer table and exit")
    g.add_argument("--resume", metavar="PATH", nargs="?", const="latest",
                   help="continue a run: a run folder or last.pth (default: the latest run, of --model if given)")
    a("--model", choices=list(RECIPES), help="three (ThreeCNN), skip (SkipConCNN), ensemble (EnsembleCNN) or res "
                                             "(ResCNN, ours, not the report's)")
    a("--data-dir", help="folder with train.csv, validation.csv, test.csv and the image folders (default: dataset)")
    a("--demo", action="store_true", help=f"use the synthetic demo set in {DEMO_DIR}/ (built if absent or older), "
                                          f"{DEMO_EPOCHS} epochs unless --epochs is given (a resumed run keeps its own)")
    a("--preset", choices=list(PRESETS), help="report (the report's recipe, default), fast (ThreeCNN at batch 256, "
                                              "for a GPU), short (Muon, 12 epochs decaying linearly, class 4 "
                                              "weighted 1.5, no rotation, flip TTA, final weights; the default of "
                                              "--model res), hour (short with ResCNN's full-resolution stage 64 "
                                              "wide and six test-time views) or strong (AdamW, warmup + cosine "
                                              "over 100 epochs, EMA, TTA, final weights)")
    add_recipe_flags(p.add_argument_group("the recipe (defaults: the report's table for --model)"))
    add_machine_flags(p.add_argument_group("speed and machine"))
    add_file_flags(p.add_argument_group("files"))
    return p


def epochs(text):
    """--epochs: a whole number stays one (12, not 12.0, in the run's settings and lines)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def add_recipe_flags(r):
    r.add_argument("--batch-size", type=int)
    r.add_argument("--lr", type=float)
    r.add_argument("--weight-decay", type=float)
    r.add_argument("--label-smoothing", type=float)
    r.add_argument("--plateau-patience", type=int, help="ReduceLROnPlateau patience (epochs)")
    r.add_argument("--plateau-factor", type=float, help="ReduceLROnPlateau factor")
    r.add_argument("--epochs", type=epochs, help="may be fractional (8.5: 8 epochs, then half of one more; what "
                   "--minutes sizes)")
    r.add_argument("--minutes", type=float, help="instead of --epochs: the epochs that fit in this many minutes "
                   "on this machine, measured when the run starts and again after its first epoch (evaluation and "
                   "submission included); --model res trains --preset hour instead where 7 of its epochs fit")
    r.add_argument("--early-stop", type=int, help="stop after this many epochs without a better val (or held-out) "
                   "accuracy (--preset short and strong: never, their schedules run to their end)")
    r.add_argument("--optimizer", choices=["adam", "adamw", "muon"], help="adam (the report's; weight decay as "
                   "L2), adamw (decoupled weight decay) or muon (torch.optim.Muon for the convolutions' weights, AdamW "
                   "for the rest)")
    r.add_argument("--scheduler", choices=["plateau", "cosine", "warmup_cosine", "linear"], help="plateau (the "
                   "report's, on the selection metric), cosine over --epochs, a linear warmup of --warmup epochs then "
                   "a cosine, or (linear, stepped every step) a linear warmup then a linear decay to zero at --epochs")
    r.add_argument("--warmup", type=float, metavar="EPOCHS", help="warmup epochs of --scheduler warmup_cosine or linear")
    r.add_argument("--holdout", type=float, metavar="FRACTION", help="hold out this fraction of train.csv (stratified, "
                   "by --seed; never trained on) to choose the checkpoint on, instead of validation")
    r.add_argument("--select", choices=["val", "holdout", "last"], help="which checkpoint is best.pth: the best "
                   "validation accuracy (the report's), the best on --holdout's rows, or the final weights")
    r.add_argument("--ema", type=float, metavar="DECAY", help="keep an EMA of the weights (e.g. 0.999); 0 = off")
    r.add_argument("--class-weights", metavar="auto|W0,..,W4", help="weight the loss per class; auto = from the "
                   "last validation recall")
    r.add_argument("--focal-gamma", type=float, help="focal loss with this gamma (0 = cross-entropy)")
    r.add_argument("--mixup", type=float, metavar="ALPHA", help="mixup with this alpha (0 = off)")
    r.add_argument("--cutmix", type=float, metavar="ALPHA", help="cutmix with this alpha (0 = off)")
    r.add_argument("--tta", action=argparse.BooleanOptionalAction, help="test-time augmentation in evaluation")
    r.add_argument("--tta-views", choices=["flip", "flip_rotate", "flip_shift"], help="--tta's views: the image and "
                   "its mirror (flip), or those and the image turned by +-8 degrees (flip_rotate, the default), or "
                   "those two each moved by one pixel down-right and up-left (flip_shift, 6 views)")
    r.add_argument("--rotate", type=float, metavar="DEGREES", help="training images turned by up to this many degrees "
                   "(the report's 15; 0 = none)")
    r.add_argument("--shift", type=int, metavar="PIXELS", help="training images moved by up to this many whole pixels "
                   "on each axis, zero fill (0 = none, the report's)")
    r.add_argument("--whiten", action=argparse.BooleanOptionalAction, help="the first convolution a frozen "
                   "whitening of the training images' 3x3 patches, computed before the first step (engine/whiten.py); "
                   "on by default for --model res")
    r.add_argument("--full-res-width", type=int, metavar="CHANNELS", help="--model res: the channels of its "
                   "full-resolution stage (its first two layers, models.py; default 32)")
    r.add_argument("--seed", type=int)


def add_machine_flags(s):
    s.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when present)")
    s.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], help="precision: bf16, fp16 (with a "
                   "GradScaler) or off (fp32); auto (default) times a few training steps in each this device runs "
                   "natively and takes the fastest (printed, and saved with the run)")
    s.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="memory layout (default: the "
                   "faster of the two, timed with --amp auto's candidates)")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (on one GPU "
                   "with CUDA graphs: faster epochs after a first one that compiles)")
    s.add_argument("--loader", choices=["tensors", "images"], help="tensors: decode once, augment batches "
                   "(default); images: the report's per-image Pillow + DataLoader path")
    s.add_argument("--workers", type=int, help="DataLoader workers for --loader images (default: the "
                   "report's 4, at most one per core)")
    s.add_argument("--pin-memory", action=argparse.BooleanOptionalAction)
    s.add_argument("--max-memory-gb", type=float, help="largest decoded split held in memory (default 4)")
    s.add_argument("--cache-dir", help="where decoded splits are cached (default DATA/.cache or ~/.cache)")
    s.add_argument("--eval-batch-size", type=int, help="batch for evaluation and prediction (default on a GPU: "
                   "256 for three, 64 for skip and ensemble, to fit 4 GB; 16 on a CPU)")
    s.add_argument("--deterministic", action=argparse.BooleanOptionalAction, help="deterministic algorithms")
    s.add_argument("--detect-anomaly", action=argparse.BooleanOptionalAction, help="autograd anomaly detection")


def add_file_flags(o):
    o.add_argument("--out-dir", help="where run folders go (default runs)")
    o.add_argument("--run-name", help="the run folder's name (default <model>-<timestamp>)")
    o.add_argument("--ckpt-dir", help="where each model's best checkpoint is kept (default models_pth)")
    o.add_argument("--skip-ckpt", help="the ensemble's SkipConCNN base (default CKPT_DIR/skip_best.pth)")
    o.add_argument("--three-ckpt", help="the ensemble's ThreeCNN base (default CKPT_DIR/three_best.pth)")
    o.add_argument("--quiet", action=argparse.BooleanOptionalAction, help="one line per epoch, no progress bars")


def parse_args(argv):
    return build_parser().parse_args(argv)



# ==============================================================================================
# Which command runs (each imports what it needs: PyTorch only once the flags are known to be good)

def run_command(args, cfg, given):
    """--summary, --compare, --evaluate, --predict, --analyze (engine/commands.py)."""
    from engine import commands
    return commands.run(args, cfg, given)


def run_training(cfg, given, resume):
    """Train (a new run, or --resume). A new run's data is checked before PyTorch is imported: a wrong folder
    or a bad CSV is one line in about a second."""
    checked = None
    if not resume:
        import dataset
        from engine import demo_data
        demo_data.ensure_if_asked(cfg["data_dir"])
        checked = dataset.check_data(cfg["data_dir"])  # read once: the run's loaders are made from it
    from engine import train
    train.Stop.signal = None
    return train.train(cfg, given, resume, checked)


# ==============================================================================================
# Entry point: user errors are one line and a non-zero exit, never a traceback

def library_error_line(e):
    """The one line for an error from PyTorch that a user can act on, or None (then it is a bug: traceback)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.OutOfMemoryError):  # one no step could name better
        return "the GPU ran out of memory: close other programs using it, or lower --eval-batch-size"
    if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
        # --compile on a machine without a C++ compiler or Triton fails at the first step: name its cause
        while (inner := e.__cause__ or getattr(e, "inner_exception", None)) is not None:
            e = inner
        reason = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]
        return f"--compile failed on this machine ({reason}): run again without --compile"
    return None


def interrupted():
    print("interrupted; the checkpoints already written are intact", file=sys.stderr)
    return 130


def main(argv=None):
    """Run one command; returns its exit code (0, 2 for a user error, 130/143 when stopped by a signal)."""
    previous_sigint = note_interrupts()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        cfg, given = resolve_config(args)
        if args.summary or args.compare is not None or args.evaluate or args.predict or args.analyze:
            code = run_command(args, cfg, given)
        else:
            code = run_training(cfg, given, args.resume)
        raise_lost_interrupt()  # a Ctrl-C lost in a library after training, or during a command: still 130
        return code
    except UserError as e:
        msg = str(e)
        if "Original Traceback" in msg:  # raised in a DataLoader worker: keep the original line
            msg = msg.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a missing permission that no step above could name better
        if e.errno not in DISK_ERRORS:
            raise
        print(f"error: {e.strerror}{f': {e.filename}' if e.filename else ''}: free some space there or fix its "
              f"permissions (a run's finished epochs are kept in its last.pth)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C at any moment, the first second of imports included
        return interrupted()
    except Exception as e:
        line = library_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    finally:
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        code = main()
    except KeyboardInterrupt:  # a Ctrl-C in the instant between this file's imports and main()'s own catch
        code = interrupted()
    # Exiting, the interpreter's last garbage collections walk every object PyTorch made: ~1.5 s on a 2-core CPU.
    # Frozen, they are skipped (every file is written and closed by now; atexit handlers still run).
    gc.freeze()
    sys.exit(code)
