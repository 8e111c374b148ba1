"""Judge runs on the training rows they held out (--holdout), never on validation: the screening's tool for
the choices made after training, such as the test-time views and soft votes of several runs.

    python -m tools.judge_holdout RUN/best.pth [RUN2/best.pth ...] [--raw] [--views flip ...]

For each checkpoint, and for their soft vote when there are several, prints the held-out accuracy and
class-4 recall without TTA and with each of --tta-views' choices (--views: only those). --raw judges the
trained weights where a run kept an EMA of them too (by default the EMA's, as main.py judges). Every
checkpoint must come from runs that held out the same rows (the same data, --holdout and --seed).
"""
import argparse
import sys

import torch

import dataloader
from engine import checkpoint, inference, runtime
from engine.recipes import DEFAULTS


def held_out_probs(path, device, views, raw=False):
    """{views: (probabilities, labels, ids)} of one checkpoint on its run's held-out rows."""
    ckpt = checkpoint.load(path)
    cfg = {**DEFAULTS, **ckpt["config"], "quiet": True, "device": str(device), "loader": "tensors"}
    if not cfg["holdout"]:
        sys.exit(f"error: {path} comes from a run without --holdout: it has no held-out rows to be judged on")
    held = dataloader.loaders_for(cfg, device, ["holdout"], sharded=False)["holdout"]
    model, _ = inference.load_for_eval(path, cfg, device)
    if raw:  # the trained weights, not their EMA
        checkpoint.load_weights(model, ckpt, path)
    amp = runtime.amp_dtype(cfg, device)
    out = {}
    for v in views:
        probs, pos, _, _ = inference.predict_probs(model, held, {**cfg, "tta_views": v}, device, amp, tta=v != "none")
        out[v] = (probs, held.labels[pos], tuple(held.ids[i] for i in pos.tolist()))
    return out


def line(name, probs, labels):
    pred = probs.argmax(1)
    four = labels == 4
    return (f"{name:<48} held-out acc {100 * (pred == labels).float().mean().item():6.2f}%  "
            f"class-4 recall {(pred[four] == 4).float().mean().item():.3f}  ({len(labels)} images)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--raw", action="store_true", help="the trained weights, not their EMA")
    p.add_argument("--views", nargs="+", choices=("none",) + dataloader.TTA_VIEWS,
                   help="only these (default: none and every --tta-views choice)")
    a = p.parse_args(argv)
    device = torch.device("cpu")
    views = tuple(a.views or ("none",) + dataloader.TTA_VIEWS)
    every = [held_out_probs(path, device, views, a.raw) for path in a.checkpoints]
    for path, res in zip(a.checkpoints, every):
        for v in views:
            print(line(f"{path} [{v}]", res[v][0], res[v][1]))
    if len(every) > 1:
        if len({res[views[0]][2] for res in every}) > 1:
            sys.exit("error: these runs held out different rows: no vote over them")
        for v in views:
            print(line(f"soft vote of {len(every)} [{v}]", sum(res[v][0] for res in every) / len(every),
                       every[0][v][1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
