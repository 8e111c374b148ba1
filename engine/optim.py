"""The optimizers (the report's Adam, AdamW, and Muon for the convolutions beside AdamW for the rest), loading their
saved state, the learning-rate schedules, and a run's length in steps (--epochs may end part-way through an
epoch). The loss is in loss.py, the EMA of the weights in ema.py; state.py puts them together into a run's state,
trainstep.py into a step.
"""
import math

import torch
import torch.nn as nn

from engine import runtime


def make_optimizer(params, lr, weight_decay=0.0, kind="adam"):
    """Adam (the report's: weight decay added to the gradient, as L2) or AdamW (weight decay applied to the
    weights apart from the gradient's scaling), fused: one kernel updates every parameter. The default (a
    loop over the parameters on a CPU) takes several times as long there (tools/bench.py measures both); on a GPU
    fused is the library's fastest too, and works with the GradScaler. muon: MuonAdamW (below)."""
    params = [p for p in params if p.requires_grad]
    if kind == "muon":
        return MuonAdamW(params, lr=lr, weight_decay=weight_decay,
                         ns_fp32=bool(params) and "bf16" not in runtime.native_precisions(params[0].device))
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

    def __init__(self, params, lr, weight_decay, ns_fp32=False):
        convs = [p for p in params if p.ndim == 4]
        rest = [p for p in params if p.ndim != 4]
        super().__init__([dict(params=convs), dict(params=rest)], dict(lr=lr, weight_decay=weight_decay))
        self.channels_last = [not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
                              for p in convs]
        self.matrices = [nn.Parameter(as_matrix(p.detach(), cl, view=True)) for p, cl in zip(convs, self.channels_last)]
        muon = MuonFP32 if ns_fp32 else torch.optim.Muon
        self.muon = muon(self.matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
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
        """Muon's momentum saved with its columns in (in, kh, kw) order whatever the weights' layout, so a run
        resumed in the other layout (--channels-last auto chose anew on another machine) reads it right."""
        muon = self.muon.state_dict()
        muon["state"] = {i: {**s, "momentum_buffer": self._columns(i, s["momentum_buffer"], to_nchw=True)}
                         for i, s in muon["state"].items()}
        return dict(muon=muon, adamw=self.adamw.state_dict(), columns="nchw",
                    param_groups=[dict(lr=g["lr"]) for g in self.param_groups])

    def _columns(self, i, buf, to_nchw):
        """A momentum matrix of conv weight i, its columns from this layout to (in, kh, kw) or back."""
        if not self.channels_last[i]:
            return buf
        out, cin, kh, kw = self.param_groups[0]["params"][i].shape
        if to_nchw:
            return buf.view(out, kh, kw, cin).permute(0, 3, 1, 2).reshape(out, -1)
        return buf.view(out, cin, kh, kw).permute(0, 2, 3, 1).reshape(out, -1)

    def load_state_dict(self, state):
        muon = state["muon"]
        if state.get("columns") == "nchw":  # else an older checkpoint's: in the layout it was saved in, the run's own
            muon = {**muon, "state": {i: {**s, "momentum_buffer": self._columns(i, s["momentum_buffer"], to_nchw=False)}
                                      for i, s in muon["state"].items()}}
        self.muon.load_state_dict(muon)
        load_optimizer_state(self.adamw, state["adamw"])
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group["lr"] = saved["lr"]


def newton_schulz(g, abc, steps, eps, dtype):
    """torch.optim.Muon's Newton-Schulz iteration (torch/optim/_muon.py: about the nearest orthogonal matrix to
    g) computed in `dtype`; the library always computes it in bf16, and in bf16 this gives its result bit for
    bit (tested)."""
    a, b, c = abc
    x = g.to(dtype)
    x = x.T if g.size(0) > g.size(1) else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


class MuonFP32(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iterations in fp32 instead of bf16, on devices that only emulate
    bf16 (a CPU without AVX512-BF16 or AMX; a GTX 1650). Why: measured with `python -m tools.bench --muon` on a 2-core
    CPU limited to AVX2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, 2026-12-03), ResCNN's iterations took
    2,228 ms a step in emulated bf16 against 37 ms in fp32, within a 4.5 s fp32 training step: half of it. On a
    bf16 CPU they take 17 ms of a 0.69 s step, and the library's own step runs there. The library offers no
    switch for the precision, so this is its step with the same momentum, rate and decay, and our iteration."""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import _adjust_lr
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - group["momentum"])
                update = g.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], torch.float32)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))


# ==============================================================================================
# A run's length in steps. --epochs may be fractional (as --minutes sizes it: the steps of one more epoch that fit
# in what whole epochs leave of the budget): ceil(epochs) epochs, the last of them only its share of the steps
# (at least one). Why: whole epochs left up to an epoch of the budget unused; on a 2-core AMD EPYC (Zen 4)
# --minutes 15 trained 3 epochs of 212 s and ended after 11.9 minutes, --minutes 60 8 of ~385 s and ended after
# 54.0-54.8 (docs/results.csv).

def epoch_steps(epochs, epoch, per_epoch):
    """The training steps of epoch `epoch` (0 for the first) of a run of `epochs` epochs of per_epoch steps."""
    if epoch + 1 < math.ceil(epochs):
        return per_epoch
    return max(1, min(per_epoch, round((epochs - math.ceil(epochs) + 1) * per_epoch)))


def total_steps(epochs, per_epoch):
    return (math.ceil(epochs) - 1) * per_epoch + epoch_steps(epochs, math.ceil(epochs) - 1, per_epoch)


# Schedules stepped after every training step rather than once an epoch.
PER_STEP_SCHEDULES = ("linear",)


def make_scheduler(cfg, opt, steps_per_epoch=1):
    """plateau: the report's ReduceLROnPlateau on the selection metric; cosine over --epochs; warmup_cosine: the
    rate rises linearly over --warmup epochs (large early steps of AdamW at batch 64 on freshly initialised
    BatchNorm statistics diverge less), then falls as a cosine to ~0 at --epochs. These three step once an epoch.
    linear: stepped every step; the rate rises linearly over --warmup epochs, then falls linearly to zero at the
    last step of --epochs (total_steps). Why: over a fixed budget, a rate that decays linearly to zero at its end
    beats the step, cosine and exponential schedules, most of all when the budget is short (Li, Yumer and Ramanan,
    "Budgeted training", ICLR 2020); a per-step rate makes the warmup and the decay smooth in a run of a few
    epochs. Why LambdaLR and not SequentialLR of LinearLR / CosineAnnealingLR: the rate of any step is then one
    closed formula, which a resume with another --epochs (follow_epochs) and a skipped fp16 step
    (trainstep.follow_steps_taken) set directly, where LinearLR's chained rate would have to be replayed; and the
    checkpoints already written hold LambdaLR's state."""
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
        warm, total = round(cfg["warmup"] * steps_per_epoch), total_steps(cfg["epochs"], steps_per_epoch)

        def linear(done):  # done: steps finished; the rate of the next step
            if done < warm:
                return (done + 1) / warm
            return max(0.0, (total - done) / max(1, total - warm))
        return torch.optim.lr_scheduler.LambdaLR(opt, linear)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=cfg["plateau_patience"],
                                                      factor=cfg["plateau_factor"])


def load_optimizer_state(opt, state):
    """Adam's saved state, run fused whatever implementation wrote it (a checkpoint of PyTorch's default Adam
    says fused=None). The flag is set in the saved groups before loading, because loading reads it there:
    fused Adam keeps its step counters on the GPU beside the weights, the default Adam on the CPU."""
    if isinstance(opt, MuonAdamW):
        return opt.load_state_dict(state)
    groups = [{**g, "fused": True, "foreach": None} for g in state["param_groups"]]
    opt.load_state_dict({**state, "param_groups": groups})


def follow_epochs(sched, opt, cfg):
    """After a resume, the rate of the schedule over the --epochs given now (it may differ from the run's first):
    the schedules over a fixed length are rebuilt from cfg, and the rate of their current step is set from their
    own formula. A cosine kept at its saved length would climb again past its end; a finished run resumed from
    the end of its cosine would go on at a rate of zero."""
    if cfg["scheduler"] == "cosine" and sched.T_max != cfg["epochs"]:
        sched.T_max = cfg["epochs"]
        for group, base in zip(opt.param_groups, sched.base_lrs):
            group["lr"] = base * (1 + math.cos(math.pi * sched.last_epoch / sched.T_max)) / 2
    if cfg["scheduler"] in ("warmup_cosine", "linear"):  # LambdaLR: its factor functions were made from cfg
        for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)
