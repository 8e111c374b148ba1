"""What a training step is made of: the loss, the optimizer (and loading its saved state), the learning-rate
schedule, the EMA of the weights, and batch mixing (mixup / cutmix). train.py puts them together into the loop.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from recipes import NUM_CLASSES, fixed_class_weights


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
    fused is the library's fastest too, and works with the GradScaler. muon: MuonAdamW (below)."""
    params = [p for p in params if p.requires_grad]
    if kind == "muon":
        return MuonAdamW(params, lr=lr, weight_decay=weight_decay)
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return opt(params, lr=lr, weight_decay=weight_decay, fused=True)


def as_matrix(t, channels_last, view=False):
    """A convolution's weight (out, in, kh, kw), or its gradient, as a matrix of out rows whose columns follow
    the weight's memory: (in, kh, kw), or (kh, kw, in) where the weight is channels_last. The columns' order does
    not change what Muon does to the matrix, so long as weight and gradient share it. view=True: a view of the
    same memory, or an error (never a silent copy that Muon would step in vain)."""
    m = t.permute(0, 2, 3, 1) if channels_last else t
    return m.view(len(t), -1) if view else m.reshape(len(t), -1)


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon for the convolutions' weights and AdamW (fused) for the rest: biases, BatchNorm and the
    classifier. Why: Muon replaces each weight's update (its momentum) by about the nearest orthogonal matrix
    (five Newton-Schulz iterations), and on CIFAR-10 it cut the epochs airbench needs by ~19%. torch's Muon
    takes matrices only, so it steps a matrix view of each convolution's weight, which shares its memory. Its
    rate is matched to AdamW's (adjust_lr_fn="match_rms_adamw": a step of the same size on average), so --lr,
    --weight-decay and the schedule mean what they mean for adamw. Its param_groups are the model's own tensors
    (conv weights, rest), so the schedule, the GradScaler and zero_grad see them as for any optimizer."""

    def __init__(self, params, lr, weight_decay):
        convs = [p for p in params if p.ndim == 4]
        rest = [p for p in params if p.ndim != 4]
        super().__init__([dict(params=convs), dict(params=rest)], dict(lr=lr, weight_decay=weight_decay))
        self.channels_last = [not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                              for p in convs]
        self.matrices = [nn.Parameter(as_matrix(p.detach(), cl, view=True)) for p, cl in zip(convs, self.channels_last)]
        self.muon = torch.optim.Muon(self.matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay, fused=True)

    @torch.no_grad()
    def step(self, closure=None):
        for matrix, p, cl in zip(self.matrices, self.param_groups[0]["params"], self.channels_last):
            matrix.grad = None if p.grad is None else as_matrix(p.grad, cl)
        for opt, group in zip((self.muon, self.adamw), self.param_groups):
            opt.param_groups[0]["lr"] = group["lr"]  # the schedule sets the rate on this optimizer's groups
            opt.step()
        for matrix in self.matrices:
            matrix.grad = None

    def state_dict(self):
        return dict(muon=self.muon.state_dict(), adamw=self.adamw.state_dict(),
                    param_groups=[dict(lr=g["lr"]) for g in self.param_groups])

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        load_optimizer_state(self.adamw, state["adamw"])
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group["lr"] = saved["lr"]


# Schedules stepped after every training step rather than once an epoch.
PER_STEP_SCHEDULES = ("linear",)


def make_scheduler(cfg, opt, steps_per_epoch=1):
    """plateau: the report's ReduceLROnPlateau on the selection metric; cosine over --epochs; warmup_cosine: the
    rate rises linearly over --warmup epochs (large early steps of AdamW at batch 64 on freshly initialised
    BatchNorm statistics diverge less), then falls as a cosine to ~0 at --epochs. These three step once an epoch.
    linear: stepped every step; the rate rises linearly over --warmup epochs, then falls linearly to zero at the
    last step of --epochs. Why: over a fixed budget, a rate that decays linearly to zero at its end beats the
    step, cosine and exponential schedules, most of all when the budget is short (Li, Yumer and Ramanan,
    "Budgeted training", ICLR 2020); a per-step rate makes the warmup and the decay smooth in a run of a few
    epochs."""
    if cfg["scheduler"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg["epochs"])
    if cfg["scheduler"] == "warmup_cosine":
        warm, total = cfg["warmup"], cfg["epochs"]

        def factor(done):  # done: epochs finished
            if done < warm:
                return (done + 1) / (warm + 1)
            return 0.5 * (1 + math.cos(math.pi * (done - warm) / max(1, total - warm)))
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if cfg["scheduler"] == "linear":
        warm, total = round(cfg["warmup"] * steps_per_epoch), cfg["epochs"] * steps_per_epoch

        def linear(done):  # done: steps finished; the rate of the next step
            if done < warm:
                return (done + 1) / warm
            return max(0.0, (total - done) / max(1, total - warm))
        return torch.optim.lr_scheduler.LambdaLR(opt, linear)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=cfg["plateau_patience"],
                                                      factor=cfg["plateau_factor"])


def make_ema(model, decay):
    """An exponential moving average of the weights and BatchNorm buffers (torch.optim.swa_utils.AveragedModel),
    updated after every step with the rate min(decay, (1 + n) / (10 + n)) after n updates. Why the warm-up:
    with a fixed 0.999 the average still holds 0.999^n of the random initial weights, ~46% after the 780 steps
    of 4 epochs at batch 64, and judged that early a ResCNN said one class for every image (20.00%) while
    training accuracy was at 80%; with it, the average follows the model closely at first and settles to
    `decay` after ~10,000 steps (the warm-up of tf.train.ExponentialMovingAverage's num_updates)."""
    from torch.optim.swa_utils import AveragedModel

    @torch.no_grad()
    def update(averaged, current, n):
        rate = min(decay, (1 + float(n)) / (10 + float(n)))
        floats = [(a, c) for a, c in zip(averaged, current) if torch.is_floating_point(a)]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], 1 - rate)
        for a, c in zip(averaged, current):  # counters (BatchNorm's num_batches_tracked): the model's own
            if not torch.is_floating_point(a):
                a.copy_(c)
    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def make_mix(cfg):
    """mixup/cutmix on whole batches (torchvision.transforms.v2); returns None when both are off."""
    from torchvision.transforms import v2
    ops = []
    if cfg["mixup"]:
        ops.append(v2.MixUp(alpha=cfg["mixup"], num_classes=NUM_CLASSES))
    if cfg["cutmix"]:
        ops.append(v2.CutMix(alpha=cfg["cutmix"], num_classes=NUM_CLASSES))
    return v2.RandomChoice(ops) if ops else None


def load_optimizer_state(opt, state):
    """Adam's saved state, run fused whatever implementation wrote it (a checkpoint of PyTorch's default Adam
    says fused=None). The flag is set in the saved groups before loading, because loading reads it there:
    fused Adam keeps its step counters on the GPU beside the weights, the default Adam on the CPU."""
    if isinstance(opt, MuonAdamW):
        return opt.load_state_dict(state)
    groups = [{**g, "fused": True, "foreach": None} for g in state["param_groups"]]
    opt.load_state_dict({**state, "param_groups": groups})
