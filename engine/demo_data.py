"""A synthetic stand-in for the competition data, in the exact Kaggle layout, made in seconds.

Five "generators" paint the same kind of random scene (soft blobs of random colour on a random
gradient) and differ only in the artefacts they leave, as real generators do:

    0  upsampler     drawn at half size, nearest-upsampled, plus a strong 2-pixel checkerboard
    1  noisy         white noise over the whole image
    2  blurry        a Gaussian blur, no fine detail
    3  blocky        8x8 block offsets (a compression-like grid)
    4  mixed         a weak checkerboard plus weaker noise: the hard class, learned last

Colour statistics are drawn the same way for every class, so the mean colour says little (a
classifier on it stays near chance; the tests check it stays below 40%).
"""
import csv
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from engine import locks
from engine.recipes import DEMO_DIR

SIZE = 100
SPLIT_SIZES = {"train": 300, "validation": 100, "test": 50}  # per split, balanced over 5 classes
# Small and crisp, so that the demo trains to ~90% in 3 epochs (recipes.DEMO_EPOCHS), ~57 steps, within a minute
# on a 2-core CPU without bf16 (docs/performance.md). Training is nearly all of the demo's time, so the set is as
# small as still learns: class 0's checkerboard (28-44) stands well apart from class 4's (6-12), which let 300
# images in 3 epochs reach 85% over more seeds (9 of 10, bf16 CPU) than 400 did with a checkerboard of 12-24
# (6 of 10). With 240 images, or 2 epochs of 300-400, class 4 is often not learned yet (2026-12-01).
VERSION = "2"  # written beside the set; a demo_data/ of another version (or none) is built again


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
    """A separable Gaussian blur: the weighted sum of shifted copies, rows then columns (whole arrays at once,
    several times faster than a convolution per row)."""
    k = np.arange(-3 * int(sigma) - 1, 3 * int(sigma) + 2)
    w = np.exp(-k ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    pad, n = len(k) // 2, img.shape[0]
    out = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = sum(wi * out[i:i + n] for i, wi in enumerate(w))
    return sum(wi * out[:, i:i + n] for i, wi in enumerate(w))


def _checker(size, amp):
    yy, xx = np.mgrid[0:size, 0:size]
    return (((yy + xx) % 2) * 2 - 1)[..., None] * amp


def make_image(label, rng):
    if label == 0:
        img = _scene(rng, SIZE // 2).repeat(2, 0).repeat(2, 1) + _checker(SIZE, rng.uniform(28, 44))
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


def _version(dest):
    try:
        with open(os.path.join(dest, ".version")) as f:
            return f.read().strip()
    except OSError:
        return None


def _current(dest):
    return all(os.path.isfile(os.path.join(dest, f"{s}.csv")) for s in SPLIT_SIZES) and _version(dest) == VERSION


def ensure_if_asked(data_dir):
    """Where a run or a command reads the demo set (--demo: data_dir is DEMO_DIR), build it first if it is absent
    or of an older version."""
    if os.path.abspath(data_dir) == os.path.abspath(DEMO_DIR):
        ensure(DEMO_DIR)


def ensure(dest):
    """Build the demo set in DEST unless it is already complete and of this VERSION. One builder at a time: the set
    is built aside under a lock and moved into place whole, so a run started meanwhile waits for it and uses it."""
    if _current(dest):
        return dest
    parent = os.path.dirname(os.path.abspath(dest))
    with locks.held(os.path.join(parent, f".{os.path.basename(dest)}.lock")):
        if _current(dest):  # built by another run while this one waited
            return dest
        print(f"building the synthetic demo data set in {dest} ...")
        new = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.", dir=parent)
        build(new)
        with open(os.path.join(new, ".version"), "w") as f:
            f.write(VERSION + "\n")
        if os.path.exists(dest):  # an older or broken set: out of the way, then removed
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.old.", dir=parent)
            os.replace(dest, os.path.join(old, "set"))
            shutil.rmtree(old)
        os.replace(new, dest)
    return dest
