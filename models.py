"""The models, written to read like their layer tables: the report's three and ours. Nothing here loads a file: a
run's model, with the ensemble's bases loaded from their checkpoints, is built by engine/train.py.

    ThreeCNN     691,781 parameters   three conv blocks + a small MLP head
    SkipConCNN 8,695,045 parameters   two wide convs, one residual block, one conv, MLP head
    EnsembleCNN  9,387,553 in all,    a frozen SkipConCNN + a frozen ThreeCNN and a 727-parameter
                 727 trainable        learned blend of their softmax outputs
    ResCNN     1,958,821 parameters   ours: a residual stage at full resolution, three more, global pooling

The report gives no dropout rates; they are chosen here, in one place (DROPOUT).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.recipes import NUM_CLASSES

# Dropout rates (not in the report; our choice, stated once).
DROPOUT = {
    "three_conv": 0.25,  # Dropout2d after the third conv block
    "three_fc": 0.5,     # between the two Linear layers of the ThreeCNN head
    "skip_conv": 0.3,    # after the last conv of SkipConCNN
    "skip_fc": 0.5,      # between the two Linear layers of the SkipConCNN head
    "ensemble_meta": 0.3,  # inside the ensemble's meta classifier
    "res_fc": 0.3,       # before ResCNN's one Linear layer (as the best public solutions use, ~0.3)
}


def conv_bn_relu(c_in, c_out, **conv_kw):
    return [nn.Conv2d(c_in, c_out, kernel_size=3, **conv_kw), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class ThreeCNN(nn.Module):
    """
    | layer                                   | output      | params  |
    |-----------------------------------------|-------------|---------|
    | conv 3->64 3x3 pad 1, BN, ReLU          | 64x100x100  | 1,920   |
    | max-pool 2                              | 64x50x50    |         |
    | conv 64->128 3x3 pad 1, BN, ReLU        | 128x50x50   | 74,112  |
    | max-pool 2                              | 128x25x25   |         |
    | conv 128->192 3x3 dil 2 pad 1, BN, ReLU | 192x23x23   | 221,760 |
    | max-pool 2, Dropout2d                   | 192x11x11   |         |
    | adaptive avg pool 4x4, flatten          | 3,072       |         |
    | Linear 3072->128, ReLU, Dropout         | 128         | 393,344 |
    | Linear 128->5                           | 5           | 645     |
    """

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(3, 64, padding=1), nn.MaxPool2d(2),
            *conv_bn_relu(64, 128, padding=1), nn.MaxPool2d(2),
            *conv_bn_relu(128, 192, padding=1, dilation=2), nn.MaxPool2d(2),
            nn.Dropout2d(DROPOUT["three_conv"]),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(192 * 4 * 4, 128), nn.ReLU(inplace=True), nn.Dropout(DROPOUT["three_fc"]),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class ResidualBlock(nn.Module):
    """3x3 conv, BN, ReLU, 3x3 conv, BN; shortcut 1x1 conv + BN; add, ReLU."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn_relu(c_in, c_out, padding=1),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class SkipConCNN(nn.Module):
    """
    | layer                                     | output      | params    |
    |-------------------------------------------|-------------|-----------|
    | conv 3->128 3x3 pad 1, BN, ReLU           | 128x100x100 | 3,840     |
    | conv 128->256 3x3 pad 1, BN, ReLU         | 256x100x100 | 295,680   |
    | max-pool 2                                | 256x50x50   |           |
    | residual block 256->512 (see above)       | 512x50x50   | 3,674,624 |
    | max-pool 2                                | 512x25x25   |           |
    | conv 512->512 3x3 pad 1, BN, ReLU, Dropout| 512x25x25   | 2,360,832 |
    | adaptive avg pool 6x6, flatten            | 18,432      |           |
    | Linear 18432->128, ReLU, Dropout          | 128         | 2,359,424 |
    | Linear 128->5                             | 5           | 645       |

    The report's own table is inconsistent in its shape column and in one BatchNorm row; the
    parameter total (8,695,045) is the authority and only adds up as built here.
    """

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(3, 128, padding=1),
            *conv_bn_relu(128, 256, padding=1), nn.MaxPool2d(2),
            ResidualBlock(256, 512), nn.MaxPool2d(2),
            *conv_bn_relu(512, 512, padding=1), nn.Dropout(DROPOUT["skip_conv"]),
            nn.AdaptiveAvgPool2d(6),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(512 * 6 * 6, 128), nn.ReLU(inplace=True), nn.Dropout(DROPOUT["skip_fc"]),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class EnsembleCNN(nn.Module):
    """A learned blend of two frozen, trained base models.

    With p_s = softmax(skip(x)) and p_t = softmax(three(x)) (5 values each) and v = [p_s, p_t] (10):

        w   = softmax(weights_net(v))          weights_net: Linear(10,16)-ReLU-Linear(16,2)-Softmax
        p_w = w_0 * p_s + w_1 * p_t            the weighted vote of the bases
        p_m = softmax(meta(v))                 meta: Linear(10,32)-ReLU-Dropout-Linear(32,5)
        c   = max_k p_w[k]                     how confident the weighted vote is
        p   = c * p_w + (1 - c) * p_m          trust the bases when confident, the meta classifier when not

    forward returns log(p), so cross-entropy on it is the negative log-likelihood of p.
    The bases get no gradients and stay in eval mode (BatchNorm statistics and dropout never change).
    """

    def __init__(self, skip=None, three=None, num_classes=NUM_CLASSES):
        super().__init__()
        self.skip = skip if skip is not None else SkipConCNN(num_classes)
        self.three = three if three is not None else ThreeCNN(num_classes)
        for p in self.bases_parameters():
            p.requires_grad_(False)
        k2 = 2 * num_classes
        self.weights_net = nn.Sequential(nn.Linear(k2, 16), nn.ReLU(inplace=True), nn.Linear(16, 2), nn.Softmax(dim=1))
        self.meta = nn.Sequential(nn.Linear(k2, 32), nn.ReLU(inplace=True), nn.Dropout(DROPOUT["ensemble_meta"]),
                                  nn.Linear(32, num_classes))
        self.train()

    def bases_parameters(self):
        return [*self.skip.parameters(), *self.three.parameters()]

    def train(self, mode=True):
        super().train(mode)
        self.skip.eval()  # frozen: BatchNorm running statistics and dropout never change
        self.three.eval()
        return self

    def forward(self, x):
        with torch.no_grad():
            p_s = self.skip(x).float().softmax(1)
            p_t = self.three(x).float().softmax(1)
        v = torch.cat([p_s, p_t], dim=1)
        w = self.weights_net(v).float()
        p_w = w[:, :1] * p_s + w[:, 1:] * p_t
        p_m = self.meta(v).float().softmax(1)
        c = p_w.max(dim=1, keepdim=True).values
        p = c * p_w + (1 - c) * p_m
        return p.clamp_min(1e-12).log()


class BasicBlock(nn.Module):
    """3x3 conv, BN, ReLU, 3x3 conv, BN; identity shortcut; add, ReLU (ResNet's basic block)."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(*conv_bn_relu(c, c, padding=1, bias=False),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(self.body(x) + x)


FULL_RES_WIDTH = 32  # ResCNN's channels at full resolution (--full-res-width)


class ResCNN(nn.Module):
    """Not in the report: our stronger model, built from what the best public solutions share (a full-resolution
    start, residual stages, global average pooling, a small head with dropout) and sized for a GTX 1650.

    | layer                                          | output      | params    |
    |------------------------------------------------|-------------|-----------|
    | conv 3->32 3x3 pad 1, BN, ReLU                 | 32x100x100  | 928       |
    | basic block 32 (two 3x3 convs, identity add)   | 32x100x100  | 18,560    |
    | max-pool 2, conv 32->64, BN, ReLU, block 64    | 64x50x50    | 92,544    |
    | max-pool 2, conv 64->128, BN, ReLU, block 128  | 128x25x25   | 369,408   |
    | max-pool 2, conv 128->256, BN, ReLU, block 256 | 256x12x12   | 1,476,096 |
    | global average pool, Dropout 0.3               | 256         |           |
    | Linear 256->5                                  | 5           | 1,285     |

    1,958,821 parameters; 1.73 GFLOP (0.87 GMAC) forward per image, 5.2 GFLOP a training step per image
    (torch.utils.flop_counter; tools/bench.py prints the same count). Full resolution for a whole residual stage
    (the generators' traces are pixel-level; the report's ThreeCNN pools after its first conv), at 32
    channels rather than the 64 of the best solutions, which alone would cost ~0.74 GMAC a block.
    `width` (--full-res-width) sets the channels of the full-resolution stage, the first two rows.
    """

    def __init__(self, num_classes=NUM_CLASSES, width=FULL_RES_WIDTH):
        super().__init__()

        def stage(c_in, c_out, pool=True):  # pool first: the widening conv runs at the lower resolution
            return [*([nn.MaxPool2d(2)] if pool else []), *conv_bn_relu(c_in, c_out, padding=1, bias=False),
                    BasicBlock(c_out)]
        self.features = nn.Sequential(*stage(3, width, pool=False), *stage(width, 64), *stage(64, 128),
                                      *stage(128, 256), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(DROPOUT["res_fc"]), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


MODELS = {"three": ThreeCNN, "skip": SkipConCNN, "ensemble": EnsembleCNN, "res": ResCNN}


def build_model(name, full_res_width=None, num_classes=NUM_CLASSES):
    """The model `name`; ResCNN's full-resolution stage `full_res_width` channels wide (None: its own 32)."""
    if full_res_width is None:
        return MODELS[name](num_classes=num_classes)
    return MODELS[name](num_classes=num_classes, width=full_res_width)


def count_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
