"""Seeded synthetic detection scenes: scikit-learn digits pasted on textured backgrounds.

Everything ships inside scikit-learn (the 8x8 digits and two sample photographs), so nothing is
downloaded and the ground truth is exact. Train scenes use the train split of the digits, the
test scenes the held-out split, so test mAP measures digits the detector never saw.

A scene is ``SIZE x SIZE`` RGB in [0, 1]: a background (a random crop of one of scikit-learn's
sample photos, or smooth colour noise with a gradient), then 2-5 digits of 14-36 pixels, each
bilinearly upscaled, alpha-blended in a colour that contrasts with what lies under it, placed
without overlap. Boxes are tight around the digit's ink (upscaled intensity > 0.3).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, load_sample_images
from sklearn.model_selection import train_test_split

from models.detector import IMAGE_SIZE

DIGIT_SPLIT_SEED = 0
MIN_DIGITS, MAX_DIGITS = 2, 5
MIN_SIDE, MAX_SIDE = 14, 36
INK_THRESHOLD = 0.3


@dataclass(frozen=True)
class Scenes:
    """Images ``[N, 3, S, S]`` float32 and ground truth ``[M, 6]``: image, x1, y1, x2, y2, cls."""

    images: np.ndarray
    gt: np.ndarray


@functools.cache
def digit_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded stratified 70/30 split of the 8x8 digits (0..1), as ``(x_tr, y_tr, x_te, y_te)``."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    return tuple(  # type: ignore[return-value]
        train_test_split(
            x, digits.target, test_size=0.3, stratify=digits.target, random_state=DIGIT_SPLIT_SEED
        )[i]
        for i in (0, 2, 1, 3)
    )


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    return tuple(image.astype(np.float32) / 255.0 for image in load_sample_images().images)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased) resize of an ``[C, H, W]`` array."""
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None]
    out = F.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True,
                        align_corners=False)
    return out[0].numpy()


def background(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A textured ``[3, size, size]`` background: a photo crop or smooth colour noise."""
    if rng.random() < 0.6:
        photo = _photos()[rng.integers(len(_photos()))]
        side = int(rng.integers(size, min(photo.shape[:2]) + 1))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = photo[top : top + side, left : left + side].transpose(2, 0, 1)
        if rng.random() < 0.5:
            crop = crop[:, :, ::-1]
        image = _resize(crop, size, size)
    else:
        cells = int(rng.integers(3, 12))
        image = _resize(rng.random((3, cells, cells), dtype=np.float32), size, size)
        ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        gradient = rng.normal(0, 0.4) * ramp[None, :] + rng.normal(0, 0.4) * ramp[:, None]
        image = image + gradient[None] + rng.normal(0, 0.04, image.shape).astype(np.float32)
    contrast = rng.uniform(0.5, 1.1)
    image = (image - image.mean()) * contrast + rng.uniform(0.25, 0.75)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]]) -> bool:
    x1, y1, x2, y2 = box
    return any(x1 < b[2] + 1 and b[0] < x2 + 1 and y1 < b[3] + 1 and b[1] < y2 + 1 for b in boxes)


def paste_digits(
    image: np.ndarray, digits: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> list[tuple[float, float, float, float, int]]:
    """Blend 2-5 random digits into ``image`` in place; return their tight boxes and classes."""
    size = image.shape[-1]
    placed: list[tuple[int, int, int, int]] = []
    truth: list[tuple[float, float, float, float, int]] = []
    for _ in range(int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))):
        index = int(rng.integers(len(digits)))
        height = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        width = max(MIN_SIDE - 2, int(round(height * rng.uniform(0.75, 1.1))))
        alpha = np.clip(_resize(digits[index][None], height, width)[0], 0.0, 1.0)
        for _attempt in range(30):
            top = int(rng.integers(0, size - height + 1))
            left = int(rng.integers(0, size - width + 1))
            if not _overlaps((left, top, left + width, top + height), placed):
                break
        else:
            continue
        region = image[:, top : top + height, left : left + width]
        under = float(region.mean())
        # Ink at least 0.4 away from the mean underneath keeps every digit legible.
        level = rng.uniform(0.0, under - 0.4) if under > 0.5 else rng.uniform(under + 0.4, 1.0)
        colour = np.clip(level + rng.normal(0, 0.08, (3, 1, 1)), 0, 1).astype(np.float32)
        strength = rng.uniform(0.8, 1.0)
        region[:] = region * (1 - strength * alpha) + colour * strength * alpha
        rows = np.flatnonzero((alpha > INK_THRESHOLD).any(1))
        cols = np.flatnonzero((alpha > INK_THRESHOLD).any(0))
        placed.append((left, top, left + width, top + height))
        truth.append((left + cols[0], top + rows[0], left + cols[-1] + 1.0, top + rows[-1] + 1.0,
                      int(labels[index])))
    return truth


def make_scenes(count: int, seed: int, split: str = "train", size: int = IMAGE_SIZE) -> Scenes:
    """``count`` seeded scenes whose digits come from the ``"train"`` or ``"test"`` digit split."""
    x_tr, y_tr, x_te, y_te = digit_split()
    digits, labels = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    rng = np.random.default_rng(seed)
    images = np.empty((count, 3, size, size), dtype=np.float32)
    rows: list[tuple[float, ...]] = []
    for i in range(count):
        images[i] = background(rng, size)
        for box in paste_digits(images[i], digits, labels, rng):
            rows.append((float(i), *box))
        noise = rng.normal(0, rng.uniform(0.0, 0.03), images[i].shape).astype(np.float32)
        images[i] = np.clip(images[i] + noise, 0.0, 1.0)
    gt = np.asarray(rows, dtype=np.float32).reshape(-1, 6)
    return Scenes(images, gt)
