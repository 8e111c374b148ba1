"""The training loss and what shapes it: cross-entropy with label smoothing (or a focal loss), the class weights
(fixed, or following the last judged recall), and batch mixing (mixup / cutmix), which changes the targets the
loss compares with.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.recipes import NUM_CLASSES, fixed_class_weights


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


def make_mix(cfg):
    """mixup/cutmix on whole batches (torchvision.transforms.v2); returns None when both are off."""
    from torchvision.transforms import v2
    ops = []
    if cfg["mixup"]:
        ops.append(v2.MixUp(alpha=cfg["mixup"], num_classes=NUM_CLASSES))
    if cfg["cutmix"]:
        ops.append(v2.CutMix(alpha=cfg["cutmix"], num_classes=NUM_CLASSES))
    return v2.RandomChoice(ops) if ops else None
