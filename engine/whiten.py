"""--whiten: the model's first convolution made a frozen patch-whitening layer, its filters computed from the
training images' own patches before the first step (airbench's first layer, Keller Jordan 2024).

Why: a 3x3 patch of an RGB image has 27 numbers, strongly correlated (neighbouring pixels, and the three
colours of one pixel, are alike). The eigenvectors of their covariance are the directions a patch varies in,
from the broad brightness changes that carry most of the variance to the pixel-to-pixel differences that carry
the least, where a generator's upsampling leaves its traces. Each filter projects a patch on one direction,
scaled to unit variance, so the next layers see every direction at the same scale from the first step instead
of learning them. On CIFAR-10 airbench needed 22 epochs instead of 35 with it (its ablation). Frozen: the filters
stay the whitening, and the optimizer steps only the layers after it (Muon then leaves the first layer alone, as
torch's Muon docs and airbench advise). Measured here (docs/screening.md, held-out rows, 6 epochs of --preset
short, 2-core CPU with AVX512-BF16): 93.92% against 92.24% without it, and epochs of ~117 s against 126-151 s,
because the frozen layer has no backward pass at all (its input needs no gradient, and now its weights none).

The first convolution keeps its shape, so the model, its checkpoints and its FLOPs are unchanged. Its C filters are
the D = in x kh x kw directions by falling variance, then their negatives, taken in turn until there are C:
for ResCNN's stem (3 -> 32, 3x3), the 27 directions and the negatives of the five of largest variance (the ReLU
after the BatchNorm keeps one sign of a direction; airbench keeps both of each of its 12).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import dataloader
import dataset

IMAGES = 5000  # the training images the covariance is estimated on (airbench's 5,000; all of them change it little)
CHUNK = 100  # images unfolded at once: 100 x 27 x 98 x 98 floats, ~100 MB
EPS = 5e-4  # added to each variance before its square root: directions of no variance are not blown up


def first_conv(model):
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def training_images(batches, n=IMAGES):
    """The first n of the training split's images (the rows the run trains on), normalised as the model sees
    them, unaugmented: the same from either loader."""
    if hasattr(batches, "images"):  # TensorBatches: the decoded split
        return dataloader.normalize(batches.images[:n].float())
    unaugmented = dataloader.report_transform(train=False)  # ImageBatches: decoded here, as its validation is
    return torch.stack([unaugmented(dataset.decode_image(p)) for p in batches.data.paths[:n]])


def whitening_filters(images, kernel_size, out_channels):
    """(out_channels, C, kh, kw) filters: each projects a patch (mean removed by the BatchNorm after it) on one
    eigenvector of the patches' covariance, divided by the square root of its variance."""
    d = images.shape[1] * kernel_size[0] * kernel_size[1]
    total, outer, count = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64), 0
    for lo in range(0, len(images), CHUNK):
        p = F.unfold(images[lo:lo + CHUNK].float().cpu(), kernel_size).transpose(0, 1).reshape(d, -1).double()
        total += p.sum(1)
        outer += p @ p.T
        count += p.shape[1]
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    variances, vectors = torch.linalg.eigh(cov)  # ascending
    order = variances.argsort(descending=True)
    directions = (vectors[:, order] / (variances[order].clamp(min=0) + EPS).sqrt()).T  # (d, d), one a row
    both = torch.cat([directions, -directions])
    rows = both[torch.arange(out_channels) % len(both)]
    return rows.reshape(out_channels, images.shape[1], *kernel_size).float()


@torch.no_grad()
def whiten_first_conv(model, batches=None):
    """Freezes the model's first convolution and, given `batches` (the training split), sets it to the whitening
    of their images (a bias, if it has one, is zero: the BatchNorm after it holds the offset). A resumed run
    gives none: its checkpoint holds the filters, so they are not computed again only to be overwritten."""
    conv = first_conv(model)
    if batches is not None:
        conv.weight.copy_(whitening_filters(training_images(batches), conv.kernel_size, conv.out_channels))
        if conv.bias is not None:
            conv.bias.zero_()
    conv.requires_grad_(False)
    return conv
