"""What a training step is made of: the model to train (the ensemble's frozen bases loaded), the loss, the
optimizer (and loading its saved state), the learning-rate schedule, and batch mixing (mixup / cutmix).
train.py puts them together into the loop.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import dataset
import models
from errors import UserError
from recipes import fixed_class_weights


def build_model(cfg):
    """The model of cfg['model']; the ensemble's bases are loaded from their checkpoints (and frozen)."""
    if cfg["model"] != "ensemble":
        return models.build_model(cfg["model"])
    paths = {name: cfg[f"{name}_ckpt"] or os.path.join(cfg["ckpt_dir"], f"{name}_best.pth") for name in ("skip", "three")}
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


def make_loss(cfg, weights=None):
    if cfg["focal_gamma"]:
        gamma, ls = cfg["focal_gamma"], cfg["label_smoothing"]

        def focal(logits, target):  # focal loss: down-weights the easy examples by (1 - p)^gamma
            logp = F.log_softmax(logits.float(), 1)
            if target.dim() == 1:
                target = F.one_hot(target, logp.shape[1]).float()
            target = target * (1 - ls) + ls / logp.shape[1]
            loss = -(target * (1 - logp.exp()) ** gamma * logp)
            if weights is not None:
                loss = loss * weights
            return loss.sum(1).mean()
        return focal
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg["label_smoothing"])


def class_weights(cfg, device, recall=None):
    cw = cfg["class_weights"]
    if not cw:
        return None
    if cw == "auto":  # weight each class by how badly it was recalled at the last validation
        if recall is None:
            return None
        r = torch.tensor(recall, dtype=torch.float32).clamp_min(0.05)
        w = (1 / r) / (1 / r).mean()
        return w.clamp(0.5, 2.0).to(device)
    return torch.tensor(fixed_class_weights(cw), device=device)


def make_optimizer(params, lr, weight_decay=0.0, kind="adam"):
    """Adam (the report's: weight decay added to the gradient, as L2) or AdamW (weight decay applied to the
    weights apart from the gradient's scaling), fused: one kernel updates every parameter. The default (a
    loop over the parameters on a CPU) takes several times as long there (bench.py measures both); on a GPU
    fused is the library's fastest too, and works with the GradScaler."""
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return opt([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay, fused=True)



def make_scheduler(cfg, opt):
    """Stepped once an epoch. plateau: the report's ReduceLROnPlateau on the selection metric; cosine over
    --epochs; warmup_cosine: the rate rises linearly over --warmup epochs (large early steps of AdamW at batch
    64 on freshly initialised BatchNorm statistics diverge less), then falls as a cosine to ~0 at --epochs."""
    if cfg["scheduler"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"])
    if cfg["scheduler"] == "warmup_cosine":
        warm, total = cfg["warmup"], cfg["epochs"]

        def factor(done):  # done: epochs finished
            if done < warm:
                return (done + 1) / (warm + 1)
            return 0.5 * (1 + math.cos(math.pi * (done - warm) / max(1, total - warm)))
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=cfg["plateau_patience"],
                                                      factor=cfg["plateau_factor"])


def make_mix(cfg):
    """mixup/cutmix on whole batches (torchvision.transforms.v2); returns None when both are off."""
    from torchvision.transforms import v2
    ops = []
    if cfg["mixup"]:
        ops.append(v2.MixUp(alpha=cfg["mixup"], num_classes=dataset.NUM_CLASSES))
    if cfg["cutmix"]:
        ops.append(v2.CutMix(alpha=cfg["cutmix"], num_classes=dataset.NUM_CLASSES))
    return v2.RandomChoice(ops) if ops else None


def load_optimizer_state(opt, state):
    """Adam's saved state, run fused whatever implementation wrote it (a checkpoint of PyTorch's default Adam
    says fused=None). The flag is set in the saved groups before loading, because loading reads it there:
    fused Adam keeps its step counters on the GPU beside the weights, the default Adam on the CPU."""
    groups = [{**g, "fused": True, "foreach": None} for g in state["param_groups"]]
    opt.load_state_dict({**state, "param_groups": groups})
