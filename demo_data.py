"""A synthetic stand-in for the competition data, in the exact Kaggle layout, made in seconds.

Five "generators" paint the same kind of random scene (soft blobs of random colour on a random
gradient) and differ only in the artefacts they leave, as real generators do:

    0  upsampler     drawn at half size, nearest-upsampled, plus a 2-pixel checkerboard
    1  noisy         white noise over the whole image
    2  blurry        a Gaussian blur, no fine detail
    3  blocky        8x8 block offsets (a compression-like grid)
    4  mixed         a weaker checkerboard plus weaker noise: the hard class, confused with 0 and 1

Colour statistics are drawn the same way for every class, so the mean colour says little (a
classifier on it stays near chance; the tests check it stays below 40%).
"""
import csv
import os

import numpy as np
from PIL import Image

SIZE = 100
SPLIT_SIZES = {"train": 400, "validation": 100, "test": 50}  # per split, balanced over 5 classes
# Small and crisp, so that the demo trains to ~90% in 3 epochs (recipes.DEMO_EPOCHS) within a minute on a 2-core
# CPU without bf16 (docs/performance.md); the artefacts are strong enough to be learned in ~75 steps.


def _scene(rng, size):
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(40, 215, 3)
    slope = rng.uniform(-60, 60, (2, 3))
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    for _ in range(rng.integers(3, 7)):
        cy, cx = rng.uniform(0, 1, 2)
        r = rng.uniform(0.08, 0.3)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-90, 90, 3)
    return img


def _blur(img, sigma):
    k = np.arange(-3 * int(sigma) - 1, 3 * int(sigma) + 2)
    w = np.exp(-k ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    pad = len(k) // 2
    out = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = np.apply_along_axis(lambda v: np.convolve(v, w, mode="valid"), 0, out)
    return np.apply_along_axis(lambda v: np.convolve(v, w, mode="valid"), 1, out)


def _checker(size, amp):
    yy, xx = np.mgrid[0:size, 0:size]
    return (((yy + xx) % 2) * 2 - 1)[..., None] * amp


def make_image(label, rng):
    if label == 0:
        img = _scene(rng, SIZE // 2).repeat(2, 0).repeat(2, 1) + _checker(SIZE, rng.uniform(12, 24))
    else:
        img = _scene(rng, SIZE)
    if label == 1:
        img = img + rng.normal(0, rng.uniform(24, 42), img.shape)
    elif label == 2:
        img = _blur(img, rng.uniform(1.5, 2.5))
    elif label == 3:
        blocks = rng.normal(0, 36, (SIZE // 8 + 1, SIZE // 8 + 1, 3))
        img = img + blocks.repeat(8, 0).repeat(8, 1)[:SIZE, :SIZE]
    elif label == 4:
        img = img + _checker(SIZE, rng.uniform(6, 12)) + rng.normal(0, rng.uniform(9, 18), img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def build(dest, sizes=None, seed=0):
    """Write DEST/{train,validation,test}.csv and DEST/<split>/<id>.png; returns DEST."""
    sizes = sizes or SPLIT_SIZES
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        os.makedirs(os.path.join(dest, split), exist_ok=True)
        labels = np.arange(n) % 5
        rng.shuffle(labels)
        rows = []
        for k, label in enumerate(labels):
            image_id = f"demo-{split}-{k:05d}"
            make_image(int(label), rng).save(os.path.join(dest, split, f"{image_id}.png"), compress_level=1)
            rows.append((image_id, int(label)))
        with open(os.path.join(dest, f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            if split == "test":
                w.writerow(["image_id"])
                w.writerows((i,) for i, _ in rows)
            else:
                w.writerow(["image_id", "label"])
                w.writerows(rows)
    return dest


def ensure(dest):
    """Build the demo set in DEST unless it is already complete."""
    if not all(os.path.isfile(os.path.join(dest, f"{s}.csv")) for s in SPLIT_SIZES):
        print(f"building the synthetic demo data set in {dest} ...")
        build(dest)
    return dest
