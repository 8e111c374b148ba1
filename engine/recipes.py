"""The recipes: the report's hyperparameter table, the presets, the defaults and the limits of every number,
held once, as data, and how one run's settings are resolved: DEFAULTS <- the model's recipe <- the preset
<- the flags given. Every value here is a flag of main.py. Nothing here imports PyTorch, so main.py resolves
and checks a run's settings in a fraction of a second.
"""
import math
import os

from engine.errors import UserError

# ==============================================================================================
# The report's table

RECIPES = {
    #            batch  lr     weight decay  label smoothing  plateau patience/factor   epochs  early-stop
    "skip":     dict(batch_size=8, lr=5e-4, weight_decay=1e-4, label_smoothing=0.0,
                     plateau_patience=5, plateau_factor=0.5, epochs=200, early_stop=25),
    "three":    dict(batch_size=16, lr=5e-4, weight_decay=1e-4, label_smoothing=0.0,
                     plateau_patience=15, plateau_factor=0.8, epochs=200, early_stop=15),
    "ensemble": dict(batch_size=4, lr=1e-4, weight_decay=1e-4, label_smoothing=0.1,
                     plateau_patience=5, plateau_factor=0.5, epochs=80, early_stop=5),
    # Not the report's: our ResCNN (models.py), trained by default with --preset short (below), its first
    # convolution a frozen whitening of the training images' 3x3 patches (engine/whiten.py; --no-whiten trains it
    # as the others): on held-out rows +1.7 points at 6 epochs and +1.8 at 12, epochs ~5-10% faster.
    "res":      dict(batch_size=64, lr=2e-3, weight_decay=5e-2, label_smoothing=0.1,
                     plateau_patience=10, plateau_factor=0.5, epochs=100, early_stop=None, whiten=True),
}

# ==============================================================================================
# Presets change a recipe; 'report' keeps it exactly.
# 'fast' is ThreeCNN's recipe at 16x the batch, for a GPU, where batch 16 leaves it waiting on Python to
# launch kernels (its epoch times are in docs/performance.md):
#   lr 2e-3 = 5e-4 x sqrt(256 / 16), the square-root rule for Adam (the noise of a step falls with sqrt(batch));
#   patience 45 epochs, not 15: the report counts patience in epochs, and an epoch here is 49 steps, not 782.
#   With 15 the runs stopped early, well below the report's recipe; with 45 they matched it (docs/results.md).
# 'short' is a fixed budget of few epochs, made for a 2-core CPU, and the default of --model res. Its choices were
# screened on 10% of train.csv held out, at 8 epochs, seed 0 (docs/screening.md; a held-out figure of 1,250 images
# moves by ~0.9 points by chance alone, so one difference under ~1.5 points shows little):
#   Muon for the convolutions' weights, AdamW for the rest (optim.py): +3.8 points over AdamW alone at 8 epochs,
#   the one large effect of the screening; batch 64, lr 2e-3, weight decay 0.05, label smoothing 0.1 (the
#   strong recipe's values, Muon's rate matched to AdamW's);
#   a warmup of 1 epoch, then a rate falling linearly to zero at the last step, stepped every step ("Budgeted
#   training", Li et al., ICLR 2020: it beat the usual schedules, most at small budgets);
#   no rotation: the generators' traces live on the pixel grid, which a nearest-pixel rotation resamples (with
#   the report's 15 degrees: -1.6 points); whole-pixel shifts of up to 2 did not help either (-0.2);
#   no EMA: its weights scored 0.2 below the raw ones at the end of the decay;
#   flip TTA (the image and its mirror) at the end: +0.2 on average over four runs (turned views: -0.1);
#   12 epochs: with Muon, 12 scored as 8 did on held-out rows (91.92 both without TTA, 92.08 against 91.52
#   with it) and were kept by the rule fixed before the run (the higher figure with flip TTA); 30-35 minutes
#   on a 2-core CPU with AVX512-BF16 (docs/performance.md); --minutes N fits it to N. Its first form, AdamW
#   over 32 epochs (93.48% over four seeds), is --optimizer adamw --epochs 32 --class-weights 1,1,1,1,1;
#   class 4 weighted 1.5 in the loss: class 4 is the one most often missed (mistaken mostly for class 1),
#   and a heavier weight moves the boundary towards it. With the weight, held-out class-4 recall
#   rose from 0.808 to 0.852 and accuracy from 92.08 to 92.80 (flip TTA), kept by the rule fixed before
#   the run (recall +0.02 or more, accuracy down 0.4 at most); --class-weights 1,1,1,1,1 turns it off (the
#   preset's second form, 94.08% over three seeds).
#   Confirmed on validation: 93.97% over three seeds, class-4 recall 0.857 (docs/results.md; now the third form,
#   --no-whiten).
#   With ResCNN's first layer a frozen whitening (RECIPES above; screened on other held-out rows: 94.72% against
#   92.88% at 12 epochs, 93.92% against 92.24% at 6): 94.77% over three seeds, class-4 recall 0.883, 25-27
#   minutes a run; at 6 epochs (--epochs 6, the 15-minute form) 94.03%, 0.877, 12.8-13.0 minutes a run.
#   The final weights are reported (--select last): nothing is chosen on validation.
# 'hour' is 'short' with ResCNN's full-resolution stage 64 channels wide instead of 32 and six test-time views
# (the image and its mirror, each also moved by a pixel down-right and up-left) instead of two: the recipe chosen
# for the best single model in an hour on a 2-core CPU with AVX512-BF16 (~1.8-2 times 'short''s time). Each of the
# two had come out ahead every time it was measured without passing its rule alone; together they passed theirs on
# a fifth split of held-out rows (docs/screening.md). On validation, three seeds: 96.16%, class-4 recall 0.911
# (trained on a GPU); a fourth on a 2-core CPU 96.24% in 90.6 minutes (a CPU half as fast as that of 'short''s).
# --model res --minutes N trains it instead of 'short' where 7 of its epochs fit (hour_for_minutes below; its
# epochs timed by budget.size_hour).
# Neither 'short', 'hour' nor 'strong' stops early (early_stop None): a fixed schedule runs to its end, where its
# rate reaches zero, however many epochs --epochs or --minutes gives it (judged on held-out rows, a 24-epoch run went
# five epochs without a better figure in the middle of its decay, where held-out accuracy dips before it rises).
# 'strong' is the recipe the best public solutions share, for any model: AdamW at batch 64, a warmup then a
# cosine over a fixed 100 epochs, label smoothing 0.1, an EMA of the weights, TTA, the report's rotation. Its
# figure is honest by construction too (--select last). Not measured whole on the real data.
PRESETS = {
    "report": {},
    "fast": dict(batch_size=256, lr=2e-3, plateau_patience=45, early_stop=45),
    "short": dict(optimizer="muon", scheduler="linear", warmup=1, batch_size=64, lr=2e-3, weight_decay=5e-2,
                  label_smoothing=0.1, class_weights="1,1,1,1,1.5", ema=0.0, tta=True, tta_views="flip", rotate=0.0,
                  shift=0, epochs=12, early_stop=None, select="last"),
    "strong": dict(optimizer="adamw", scheduler="warmup_cosine", warmup=5, batch_size=64, lr=2e-3,
                   weight_decay=5e-2, label_smoothing=0.1, ema=0.999, tta=True, epochs=100, early_stop=None,
                   select="last"),
}
PRESETS["hour"] = dict(PRESETS["short"], full_res_width=64, tta_views="flip_shift")
# The models a preset is offered for (not listed: every model). No run has shown that SkipConCNN or the
# ensemble keep their accuracy at a larger batch, and SkipConCNN at batch 64 or 256 would not fit a 4 GB card
# (tools/bench.py --memory).
PRESET_MODELS = {"fast": ("three",), "short": ("res", "three"), "hour": ("res",), "strong": ("res", "three")}
# The preset a model trains with when --preset is not given (the report's models: the report's recipe).
MODEL_PRESET = {"res": "short"}

# Everything else a run is made of, with its default (None: decided at run time).
DEFAULTS = dict(
    model="three", data_dir="dataset", preset="report", seed=0, device=None, amp="auto", channels_last="auto",
    compile=False, loader="tensors", pin_memory=True, max_memory_gb=4.0, cache_dir=None,
    workers=min(4, os.cpu_count() or 1),  # the report's 4; no more than the cores (extra workers only contend)
    eval_batch_size=None, optimizer="adam", scheduler="plateau", warmup=0, select="val", holdout=0.0, ema=0.0,
    class_weights=None, focal_gamma=0.0, mixup=0.0, cutmix=0.0, tta=False, tta_views="flip_rotate", rotate=15.0,
    shift=0, whiten=False, full_res_width=None, minutes=None, deterministic=False, detect_anomaly=False, quiet=False,
    out_dir="runs", ckpt_dir="models_pth", run_name=None, skip_ckpt=None, three_ckpt=None,
)

# Settings that change a checkpoint's predictions: --evaluate / --predict / --analyze judge a checkpoint with its
# run's own unless given on the command line (inference.judged_as).
JUDGING = ("tta", "tta_views", "channels_last", "amp", "chosen")

# Settings that may change when a run is resumed; any other difference is refused.
RESUME_MAY_CHANGE = {"device", "workers", "pin_memory", "quiet", "detect_anomaly", "loader", "cache_dir",
                     "max_memory_gb", "eval_batch_size", "epochs", "early_stop", "compile", "out_dir", "ckpt_dir",
                     "amp", "channels_last"}  # a precision or layout given on resume: from there on (budget.py)

# What each number of a run may be. A value outside is refused in one line before anything starts: batch 0
# would divide by zero at the first epoch, a negative lr fails inside Adam with a traceback, and an EMA decay
# of 1.5 or a plateau factor of 2 would train on quietly to a useless model.
LIMITS = {  # setting: (is it valid, what it may be)
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: 0 < v < math.inf, "a number above 0"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "0 or more"),
    "label_smoothing": (lambda v: 0 <= v < 1, "0 or more and below 1"),
    "plateau_patience": (lambda v: v >= 0, "0 or more"),
    "plateau_factor": (lambda v: 0 < v < 1, "above 0 and below 1"),
    "epochs": (lambda v: 1 <= v < math.inf, "at least 1"),
    "early_stop": (lambda v: v is None or v >= 1, "at least 1"),
    "ema": (lambda v: 0 <= v < 1, "0 (off) or a decay below 1, such as 0.999"),
    "focal_gamma": (lambda v: 0 <= v < math.inf, "0 (off) or more"),
    "mixup": (lambda v: 0 <= v < math.inf, "0 (off) or more"),
    "cutmix": (lambda v: 0 <= v < math.inf, "0 (off) or more"),
    "workers": (lambda v: v >= 0, "0 (no worker processes) or more"),
    "max_memory_gb": (lambda v: 0 < v < math.inf, "a number above 0"),
    "eval_batch_size": (lambda v: v is None or v >= 1, "at least 1"),
    "warmup": (lambda v: v >= 0, "0 (off) or more epochs"),
    "holdout": (lambda v: 0 <= v < 0.5, "0 (off) or a fraction below 0.5, such as 0.1"),
    "rotate": (lambda v: 0 <= v <= 180, "0 (no rotation) to 180 degrees"),
    "shift": (lambda v: 0 <= v <= 50, "0 (no shift) to 50 pixels"),
    "minutes": (lambda v: v is None or 0 < v < math.inf, "a number of minutes above 0"),
    "full_res_width": (lambda v: v is None or v >= 1, "at least 1 channel"),
}

DEMO_DIR = "demo_data"
DEMO_EPOCHS = 3  # the demo set is made to be learned in 3 (demo_data.py)
NUM_CLASSES = 5  # the five generators (labels 0-4)


# ==============================================================================================
# Resolving one run's settings

def fixed_class_weights(cw):
    """--class-weights W0,..,W4 as five floats; a malformed value is one line."""
    try:
        w = [float(x) for x in cw.split(",")]
        assert len(w) == NUM_CLASSES and all(0 <= x < math.inf for x in w) and sum(w) > 0
    except (ValueError, AssertionError):
        raise UserError(f"--class-weights {cw!r}: give 'auto' or five numbers of 0 or more like 1,1,1,1,1.5")
    return w


def resolve_config(args):
    """DEFAULTS <- the model's recipe <- the preset <- the flags given. Returns (config, flags given)."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in set(DEFAULTS) | set(RECIPES["three"])}
    if args.demo:
        given.setdefault("data_dir", DEMO_DIR)
        given.setdefault("ckpt_dir", os.path.join("models_pth", "demo"))
        if not args.resume:  # a resumed demo run keeps its own --epochs (a 1-epoch run is not stretched to 3)
            given.setdefault("epochs", DEMO_EPOCHS)
    cfg = dict(DEFAULTS)
    cfg["model"] = given.get("model", DEFAULTS["model"])
    preset = cfg["preset"] = given.get("preset", MODEL_PRESET.get(cfg["model"], "report"))
    if cfg["model"] not in PRESET_MODELS.get(preset, RECIPES):
        raise UserError(f"--preset {preset} is offered for --model {' / '.join(PRESET_MODELS[preset])} only: "
                        f"use --preset report with --model {cfg['model']}")
    cfg.update(RECIPES[cfg["model"]])
    cfg.update(PRESETS[preset])
    cfg.update(given)
    if cfg["holdout"] and "select" not in given:
        cfg["select"] = "holdout"  # held-out rows exist to choose the checkpoint on: never validation
    for k, (ok, what) in LIMITS.items():
        if not ok(cfg[k]):
            raise UserError(f"--{k.replace('_', '-')} {cfg[k]}: it must be {what}")
    check_selection(cfg)
    if cfg["optimizer"] == "muon" and cfg["model"] == "ensemble":
        raise UserError("--optimizer muon steps the weights of convolutions, and --model ensemble trains none (only "
                        "the blend of its frozen bases): use --optimizer adam or adamw")
    if cfg["whiten"] and cfg["model"] == "ensemble":
        raise UserError("--whiten makes a model's first convolution a frozen whitening, and --model ensemble trains "
                        "none (only the blend of its frozen bases): leave --whiten out")
    if cfg["full_res_width"] is not None and cfg["model"] != "res":
        raise UserError(f"--full-res-width sets the channels of ResCNN's full-resolution stage, and --model "
                        f"{cfg['model']} is the report's, as its layer table has it: leave --full-res-width out")
    if cfg["minutes"] and args.epochs is not None and not args.resume:
        raise UserError(f"--minutes {cfg['minutes']:g} chooses the epochs that fit: give --minutes or --epochs, not both")
    if cfg["class_weights"] and cfg["class_weights"] != "auto":
        fixed_class_weights(cfg["class_weights"])  # refused now, not after the run folder is made
    return cfg, given


def hour_for_minutes(cfg, given):
    """The run's settings with --preset hour's, for a run that --minutes may move to it (budget.size_hour): one of
    --model res's default recipe with a time budget, neither --preset nor one of hour's own settings given.
    None for any other run."""
    changes = {k: v for k, v in PRESETS["hour"].items() if PRESETS["short"].get(k) != v}
    if cfg["model"] != "res" or "preset" in given or not cfg["minutes"] or any(k in given for k in changes):
        return None
    return {**cfg, **changes, "preset": "hour"}


def stops_early(cfg, bad_epochs):
    """--early-stop N: N epochs without a better selection accuracy end the run (None: never, as a fixed schedule)."""
    return cfg["early_stop"] is not None and bad_epochs >= cfg["early_stop"]


def check_selection(cfg):
    """--select val (the report's: the checkpoint of the best validation accuracy), holdout (the best accuracy on
    --holdout's rows), last (the final, or EMA, weights of a fixed schedule). With holdout or last the run
    never looks at validation to decide anything, so the plateau schedule, which steps on the selection
    metric, needs held-out rows; last needs a schedule fixed in advance."""
    if cfg["select"] == "holdout" and not cfg["holdout"]:
        raise UserError("--select holdout needs --holdout FRACTION (the training rows to hold out, such as 0.1)")
    if cfg["select"] != "val" and cfg["class_weights"] == "auto" and not cfg["holdout"]:
        raise UserError("--class-weights auto follows the last validation recall: with --select "
                        f"{cfg['select']} give --holdout FRACTION (it then follows the held-out recall)")
    if cfg["select"] == "last" and cfg["scheduler"] == "plateau":
        raise UserError("--select last needs a fixed schedule (--scheduler cosine, warmup_cosine or linear): the plateau "
                        "schedule steps on validation accuracy")


# Folders and files a checkpoint keeps as absolute paths, so a run resumes from any working directory.
PATH_SETTINGS = ("data_dir", "cache_dir", "out_dir", "ckpt_dir", "skip_ckpt", "three_ckpt")


def absolute_paths(cfg):
    return {**cfg, **{k: os.path.abspath(cfg[k]) for k in PATH_SETTINGS if cfg.get(k)}}
