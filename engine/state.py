"""A run's state, kept in one place: the model (in its memory layout and precision), the optimizer, the schedule,
the GradScaler, the EMA, the loss and batch mixing, the random generator, and where the run stands (epoch, step,
the best score so far ...). build() makes it the same way for a run (train.py), for the timings before it
(budget.py: --amp auto, --channels-last auto, --minutes) and for tools/bench.py, so a training step
(trainstep.py) always works on the same thing. A checkpoint is its state_dict(); resuming is load_state_dict().

    state = build(cfg, model, device, amp, channels_last, steps_per_epoch)
    checkpoint.save(state.state_dict(), path)   ...   state.load_state_dict(checkpoint.load(path), path)
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from engine import checkpoint, loss, optim, runtime
from engine.ema import EMA, make_ema
from engine.recipes import NUM_CLASSES, absolute_paths
from engine.runtime import log


@dataclass(eq=False)
class TrainState:
    """Everything a training run changes as it goes, and so everything its checkpoints hold: state_dict() writes
    it as plain types and tensors, load_state_dict() puts a run back exactly where it stopped."""
    cfg: dict
    device: torch.device
    amp: torch.dtype | None  # the autocast dtype, None for fp32
    channels_last: bool
    raw: nn.Module  # the weights saved
    model: nn.Module  # what the step calls: raw, compiled and under DDP as asked
    opt: torch.optim.Optimizer
    sched: object  # a torch.optim.lr_scheduler
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    ema: EMA | None
    loss_fn: nn.Module
    mix: object  # mixup / cutmix, or None
    skipped: torch.Tensor  # fp16 steps skipped since the schedule last caught up (on the device: no host sync)
    gen: torch.Generator | None = None  # draws the epochs' orders and augmentations
    data_rows: dict | None = None  # the data the run trains on (dataset.resume_digests): a resume checks it
    # Where the run stands; a new run starts from these.
    epoch: int = 0
    step: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    plan: list | None = None  # the epoch's order of batches, saved mid-epoch
    recall: list | None = None  # the last judged per-class recall (--class-weights auto follows it)
    partial: torch.Tensor | None = None  # the epoch's running loss sum, correct and count, on the device
    finished: bool = False

    COUNTERS = ("epoch", "step", "best_acc", "best_epoch", "bad_epochs", "plan", "recall")

    def state_dict(self):
        """What last.pth and best.pth hold: plain types and tensors (checkpoint.load reads them weights_only)."""
        e = self.ema
        return dict(format=checkpoint.FORMAT, model=self.cfg["model"], num_classes=NUM_CLASSES,
                    config=absolute_paths(self.cfg), **{k: getattr(self, k) for k in self.COUNTERS},
                    finished=self.finished, state_dict=self.raw.state_dict(), optimizer=self.opt.state_dict(),
                    scheduler=self.sched.state_dict(), scaler=self.scaler.state_dict(),
                    ema_state_dict=e.module.state_dict() if e is not None else None,
                    ema_n=int(e.n_averaged) if e is not None else 0, rng=checkpoint.rng_state(self.gen),
                    partial=self.partial.cpu(), data=self.data_rows, skipped=int(self.skipped))

    def load_state_dict(self, ckpt, path):
        """Continue exactly where the run stopped: weights, optimizer, schedule, scaler, EMA, random state, counters.
        path: the checkpoint's file, named in errors."""
        checkpoint.load_weights(self.raw, ckpt, path)
        optim.load_optimizer_state(self.opt, ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        optim.follow_epochs(self.sched, self.opt, self.cfg)  # the schedule over the --epochs given now
        if self.scaler.is_enabled() and ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])
        elif self.scaler.is_enabled():  # it trained in bf16 or fp32 until now: their GradScaler saves nothing
            log("note: fp16 from here: the checkpoint has no GradScaler state (it trained in another precision), so "
                "the scaler starts afresh")
        self.skipped.fill_(ckpt.get("skipped", 0))
        if self.ema is not None:
            checkpoint.load_weights(self.ema.module, ckpt, path, key="ema_state_dict")
            self.ema.n_averaged.fill_(ckpt["ema_n"])
        checkpoint.set_rng_state(ckpt["rng"], self.gen)
        for k in self.COUNTERS:
            setattr(self, k, ckpt[k])
        self.partial = ckpt["partial"].to(self.device)


def build(cfg, raw, device, amp, channels_last, steps_per_epoch, recall=None, compile=None, ddp=None, gen=None,
          data_rows=None):
    """The state of a run of `raw` (a model on `device`) at its start. compile / ddp: default to the run's
    (--compile; torchrun); gen: the run's random generator (runtime.seed_everything); data_rows: its data
    (dataset.resume_digests)."""
    if channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    opt = optim.make_optimizer(raw.parameters(), cfg["lr"], cfg["weight_decay"], cfg["optimizer"])
    model = raw
    if cfg["compile"] if compile is None else compile:
        model = runtime.compile_model(model, device)
    if runtime.WORLD > 1 if ddp is None else ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return TrainState(
        cfg=cfg, device=device, amp=amp, channels_last=channels_last, raw=raw, model=model, opt=opt,
        sched=optim.make_scheduler(cfg, opt, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=amp == torch.float16),
        ema=make_ema(raw, cfg["ema"]) if cfg["ema"] else None,
        loss_fn=loss.make_loss(cfg, loss.class_weights(cfg, device, recall)), mix=loss.make_mix(cfg),
        skipped=torch.zeros((), dtype=torch.long, device=device), gen=gen, data_rows=data_rows,
        partial=torch.zeros(3, device=device))
