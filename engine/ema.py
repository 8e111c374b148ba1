"""The exponential moving average of the weights (--ema): a second copy of the model that follows the trained one,
updated after every step taken, and judged in its place where a run keeps one.
"""
import itertools

import torch
import torch.optim.swa_utils


def make_ema(model, decay):
    """An exponential moving average of the weights and BatchNorm buffers (EMA, below), updated after every step
    taken with the rate min(decay, (1 + n) / (10 + n)) after n updates. Why the warm-up: with a fixed 0.999 the
    average still holds 0.999^n of the random initial weights, ~46% after the 780 steps of 4 epochs at batch 64,
    and judged that early a ResCNN said one class for every image (20.00%) while training accuracy was at 80%;
    with it, the average follows the model closely at first and settles to `decay` after ~10,000 steps (the
    warm-up of tf.train.ExponentialMovingAverage's num_updates)."""
    return EMA(model, decay)


class EMA(torch.optim.swa_utils.AveragedModel):
    """torch.optim.swa_utils.AveragedModel (the copy of the model, its count n_averaged, and how --evaluate
    reads it), updated without a host sync: the library's update_parameters reads n_averaged on the host twice
    a step, which on a GPU stalls every step. Here the rate is computed on the device, and `taken` (a 0-d bool
    tensor on the device: the fp16 step was not skipped) gates the update, so a skipped step leaves the
    average and its count where they were."""

    def __init__(self, model, decay):
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model, taken=None):
        n = self.n_averaged.double()
        weight = torch.where(n == 0, 1.0, 1 - torch.clamp((1 + n) / (10 + n), max=self.decay))  # the first copies
        if taken is not None:
            weight = weight * taken
        pairs = list(zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                         itertools.chain(model.parameters(), model.buffers())))
        floats = [(a, c) for a, c in pairs if torch.is_floating_point(a)]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c.detach() for _, c in floats], weight)
        for a, c in pairs:  # counters (BatchNorm's num_batches_tracked): the model's own
            if not torch.is_floating_point(a):
                a.copy_(c if taken is None else torch.where(taken, c, a))
        self.n_averaged += 1 if taken is None else taken
