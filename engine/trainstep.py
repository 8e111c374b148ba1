"""One training step on a run's state (state.py): forward, loss, backward, the optimizer, the per-step schedule,
the EMA; and the schedule set back by the fp16 steps skipped. The run (train.py), the timings before it
(budget.py) and tools/bench.py all step with it, so the step exists once.

    loss, out = step(state, x, y)          ... and every 50 steps: follow_steps_taken(state)
"""
import torch

from engine import optim


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
