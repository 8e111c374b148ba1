"""Inference: a model's softmax probabilities over a split (with the test-time views, halving the batch when a GPU
runs out of memory), each epoch's judging (loss, accuracy, per-class recall, reduced across processes), a
checkpoint loaded for judging as its run judged it, and the soft vote of several checkpoints.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import dataloader
import models
from engine import checkpoint, runtime
from engine.recipes import JUDGING, NUM_CLASSES
from engine.runtime import log

# ==============================================================================================
# Probabilities and each epoch's judging

def predict_probs(model, batches, cfg, device, amp, tta=False, desc="eval"):
    """Softmax probabilities in split order, plus (summed loss, count) when the split is labelled.
    A GPU that runs out of memory gets the split again at half the batch: an evaluation never ends a run
    that trained well (when the split is shared out under torchrun the processes must agree on the batch,
    so there it is an error)."""
    while True:
        try:
            return _predict_probs(model, batches, cfg, device, amp, tta, desc)
        except torch.OutOfMemoryError:
            if batches.world > 1 or batches.batch_size == 1:
                raise
        # Here, out of the except block, the failed attempt's tensors (held by the traceback) are freed.
        torch.cuda.empty_cache()
        batches.batch_size //= 2
        log(f"note: out of GPU memory evaluating at batch {2 * batches.batch_size}; evaluating at "
            f"{batches.batch_size} (--eval-batch-size sets it)")


@torch.inference_mode()
def _predict_probs(model, batches, cfg, device, amp, tta, desc):
    model.eval()
    probs, pos, loss_sum, count = [], [], torch.zeros((), device=device), 0
    channels_last = runtime.channels_last(cfg, device)
    with runtime.progress(len(batches), desc, cfg) as bar:  # closed also when an out-of-memory error ends it
        for x, y, idx in batches.batches(batches.plan()):
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            views = dataloader.tta_views(x, cfg["tta_views"]) if tta else [x]
            p = 0
            for v in views:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    p = p + model(v).float().softmax(1)
            p = p / len(views)
            if y is not None:
                loss_sum += F.nll_loss(p.clamp_min(1e-12).log(), y, reduction="sum")
                count += len(y)
            probs.append(p)
            pos.append(idx)
            bar.update(1)
    return torch.cat(probs).cpu(), torch.cat(pos), loss_sum, count


def evaluate_split(model, batches, cfg, device, amp):
    """(loss, accuracy, per-class recall) over the split, reduced across processes: each epoch's judging. With TTA
    only where the figure decides something (--select val or holdout): under --select last it is only logged, and
    TTA would cost 2-4x the evaluation for nothing (the end of the run judges with it)."""
    tta = cfg["tta"] and cfg["select"] != "last"
    probs, pos, loss_sum, count = predict_probs(model, batches, cfg, device, amp, tta, "validate")
    y = batches.labels[pos]
    pred = probs.argmax(1)
    k = NUM_CLASSES
    per_class = torch.stack([torch.bincount(y, minlength=k), torch.bincount(y[pred == y], minlength=k)]).float()
    totals = torch.cat([torch.stack([loss_sum.cpu(), torch.tensor(float(count))]), per_class.flatten()])
    if runtime.WORLD > 1:
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    loss, n, per_class = totals[0].item(), totals[1].item(), totals[2:].view(2, k)
    recall = (per_class[1] / per_class[0].clamp_min(1)).tolist()
    return loss / n, per_class[1].sum().item() / n, recall


# ==============================================================================================
# Checkpoints loaded for judging, and the soft vote

def load_for_eval(path, cfg, device, expect_model=None):
    ckpt = checkpoint.load(path, expect_model=expect_model)
    return model_for_eval(ckpt, path, cfg, device), ckpt


def model_for_eval(ckpt, path, cfg, device):
    # the shape its run trained (a checkpoint from before --full-res-width has none: ResCNN's own); an ensemble's
    # checkpoint holds its bases' weights too
    model = models.build_model(ckpt["model"], (ckpt.get("config") or {}).get("full_res_width"))
    checkpoint.load_weights(model, {**ckpt, "state_dict": checkpoint.eval_state(ckpt)}, path)
    model = model.to(device)
    if runtime.channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def judged_as(cfg, ckpt, given):
    """The settings a checkpoint is judged with: those of the run that made it (its TTA and views, layout and
    precision) unless the command line gave them (`given`), so --evaluate and --predict of a run's checkpoint
    give its own report and submission."""
    own = ckpt.get("config") or {}
    return {**cfg, **{k: own[k] for k in JUDGING if k in own and k not in given}}


def describe_judging(cfg, ckpt, amp):
    views = f"TTA ({cfg['tta_views']})" if cfg["tta"] else "no TTA"
    weights = "EMA weights" if ckpt.get("ema_state_dict") is not None else "trained weights"
    return f"{views}, {weights}, {runtime.dtype_name(amp)}"


def vote_probs(cfg, paths, batches, device, amp, expect_model=None, given=None):
    """Average of the softmax outputs of every checkpoint in `paths` (one path: just that model). given: the flags
    of an --evaluate / --predict command, each checkpoint being judged as its run judged it where they say
    nothing (judged_as); None: judged with cfg as it is (the end of a run: its own settings)."""
    total = 0
    for path in paths:
        ckpt = checkpoint.load(path, expect_model=expect_model if len(paths) == 1 else None)
        own = cfg if given is None else judged_as(cfg, ckpt, given)
        own_amp = amp if given is None else runtime.amp_dtype(own, device)
        model = model_for_eval(ckpt, path, own, device)
        if given is not None:
            log(f"{path}: judged with {describe_judging(own, ckpt, own_amp)}")
        probs, pos, _, _ = predict_probs(model, batches, own, device, own_amp, own["tta"], f"{os.path.basename(path)}")
        total = total + probs
    return total / len(paths), pos
