"""One training step and what it works on: the model in its memory layout and precision, the optimizer, the
schedule, the GradScaler, the EMA, the loss and batch mixing. build_state makes them the same way for the run
(train.py), for the timings before it (budget.py: --amp auto, --channels-last auto, --minutes) and for tools/bench.py,
so the step exists once.

    state = build_state(cfg, model, device, amp, channels_last, steps_per_epoch)
    loss, out = step(state, x, y)          ... and every 50 steps: follow_steps_taken(state)
"""
from types import SimpleNamespace

import torch
import torch.nn as nn

from engine import optim
from engine import runtime


def build_state(cfg, raw, device, amp, channels_last, steps_per_epoch, recall=None, compile=None, ddp=None):
    """What a step of `raw` (a model on `device`) works on, as a namespace: raw (the weights saved), model (what the
    step calls: compiled and under DDP as asked), opt, sched, scaler (enabled for fp16 only), ema, loss_fn, mix,
    and skipped (fp16 steps skipped since the schedule last caught up, on the device). compile / ddp: default to
    the run's (--compile; torchrun)."""
    if channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    opt = optim.make_optimizer(raw.parameters(), cfg["lr"], cfg["weight_decay"], cfg["optimizer"])
    model = raw
    if cfg["compile"] if compile is None else compile:
        model = runtime.compile_model(model, device)
    if runtime.WORLD > 1 if ddp is None else ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return SimpleNamespace(
        cfg=cfg, device=device, amp=amp, channels_last=channels_last, raw=raw, model=model, opt=opt,
        sched=optim.make_scheduler(cfg, opt, steps_per_epoch), scaler=torch.amp.GradScaler(
            device.type, enabled=amp == torch.float16), ema=optim.make_ema(raw, cfg["ema"]) if cfg["ema"] else None,
        loss_fn=optim.make_loss(cfg, optim.class_weights(cfg, device, recall)), mix=optim.make_mix(cfg),
        skipped=torch.zeros((), dtype=torch.long, device=device))


def step(s, x, y):
    """One training step on a batch: forward, loss, backward, the optimizer, the per-step schedule, the EMA.
    Returns (loss, the model's output)."""
    x = x.contiguous(memory_format=torch.channels_last) if s.channels_last else x
    target = y
    if s.mix is not None:
        x, target = s.mix(x, y)
    with torch.autocast(s.device.type, dtype=s.amp, enabled=s.amp is not None):
        out = s.model(x)
        loss = s.loss_fn(out.float(), target)
    s.opt.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    taken = None
    if s.scaler.is_enabled():
        # fp16: a step whose gradients overflowed is skipped and the scale lowered (normal, not an error; several
        # happen while the scale settles in the first steps). The EMA and the schedule count the steps taken, not
        # these: whether it is taken is read on the device (the unscaled gradients' norm is finite), no host sync.
        s.scaler.unscale_(s.opt)
        taken = torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in s.raw.parameters()
                                                              if p.grad is not None]))
        s.skipped += ~taken
    s.scaler.step(s.opt)
    s.scaler.update()
    if s.cfg["scheduler"] in optim.PER_STEP_SCHEDULES:
        s.sched.step()
    if s.ema is not None:
        s.ema.update_parameters(s.raw, taken)
    return loss, out


def follow_steps_taken(s):
    """A per-step schedule set back by the fp16 steps skipped since it last caught up, so that its rate is that of
    the steps taken. Read where the loop checks its losses anyway (every 50 steps and at the end of an epoch): a
    host sync per step would stall a GPU. Between two checks the rate runs ahead by those few skipped steps."""
    if not s.scaler.is_enabled() or s.cfg["scheduler"] not in optim.PER_STEP_SCHEDULES:
        return
    k = int(s.skipped.item())
    if k:
        s.sched.last_epoch -= k + 1
        s.sched.step()  # the rate of step last_epoch, from the schedule's own formula
        s.skipped.zero_()
