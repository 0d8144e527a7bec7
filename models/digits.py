"""A small trained VGG-style CNN on scikit-learn's digits, shipped as ONNX for accuracy checks.

The zoo's random-weight models can only show that a rewrite preserves outputs; this model
lets lossy passes (e.g. 1x1 bottlenecks, quantisation) be judged by test accuracy. The data
ships inside scikit-learn, so nothing is downloaded.

Pipeline: 8x8 images (0..16) -> /16 -> bilinear upsample to 28x28 (``align_corners=False``)
-> normalise with the train split's mean and std. The split is a seeded, stratified 70/30.

``python -m models.digits`` trains deterministically on CPU and writes to ``models/trained/``:

* ``digits_cnn.onnx``: input "input" [batch,1,28,28], output "logits" [batch,10], opset 17.
  Exported in eval mode with constant folding off, so BatchNorm stays as
  BatchNormalization nodes (the legacy exporter would otherwise fuse it into the convs).
* ``digits_calib.npz``: "input" float32 [256,1,28,28] and "labels" int64, a stratified
  sample of the *train* split (for calibration without touching test data).
* ``digits_test.npz``: the whole test split, "input" and "labels".
* ``digits_cnn.json``: accuracy (measured with onnxruntime on the ONNX file), seed, data and
  architecture summary.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from models.export import batch_axes, export_module, run_onnx
from models.zoo import count_macs

SEED = 0
IMAGE_SIZE = 28
NUM_CLASSES = 10
TEST_FRACTION = 0.3
CALIB_SIZE = 256
OPSET = 17
# Feature extractor: ints are 3x3 conv+BN+ReLU widths, "M" is a 2x2 max pool (28->14->7->3).
FEATURES: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256)
HIDDEN = 64

TRAINED_DIR = Path(__file__).resolve().parent / "trained"
ONNX_PATH = TRAINED_DIR / "digits_cnn.onnx"
CALIB_PATH = TRAINED_DIR / "digits_calib.npz"
TEST_PATH = TRAINED_DIR / "digits_test.npz"
META_PATH = TRAINED_DIR / "digits_cnn.json"

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- data


def upsample(images: np.ndarray) -> np.ndarray:
    """Scale 8x8 digits (0..16) to [0, 1] and bilinearly resize to [N, 1, 28, 28] float32."""
    x = torch.from_numpy(images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.numpy()


def _raw_split(seed: int) -> Split:
    digits = load_digits()
    x = upsample(digits.images)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed
    )
    return x_train, y_train, x_test, y_test


def load_digits_split(seed: int = SEED) -> Split:
    """Return normalised ``(x_train, y_train, x_test, y_test)``; x float32 NCHW, y int64.

    Normalisation uses the train split's statistics only (see ``normalization``).
    """
    x_train, y_train, x_test, y_test = _raw_split(seed)
    mean, std = normalization(seed)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def normalization(seed: int = SEED) -> tuple[float, float]:
    """Mean and std of the [0, 1]-scaled train split, as applied by ``load_digits_split``."""
    x_train = _raw_split(seed)[0]
    return float(x_train.mean()), float(x_train.std())


def calibration_subset(
    x_train: np.ndarray, y_train: np.ndarray, size: int = CALIB_SIZE, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded sample of the train split for post-training calibration."""
    x_cal, _, y_cal, _ = train_test_split(
        x_train, y_train, train_size=size, stratify=y_train, random_state=seed
    )
    return x_cal, y_cal


# --------------------------------------------------------------------------- model


class DigitsCNN(nn.Module):
    """VGG-style CNN: 3x3 conv+BN+ReLU stacks with max pools, then a two-layer dense head."""

    def __init__(self, features: Sequence[int | str] = FEATURES, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.features, channels, size = _feature_stack(features)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, hidden),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _feature_stack(spec: Sequence[int | str]) -> tuple[nn.Sequential, int, int]:
    """Build the conv stack; return it with its output channels and spatial size."""
    layers: list[nn.Module] = []
    channels, size = 1, IMAGE_SIZE
    for item in spec:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            size //= 2
        else:
            width = int(item)
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            channels = width
    return nn.Sequential(*layers), channels, size


def describe(model: nn.Module) -> list[str]:
    """One line per leaf layer, for the JSON summary."""
    leaves = (item for item in model.named_modules() if not list(item[1].children()))
    return [f"{name}: {module}" for name, module in leaves]


# --------------------------------------------------------------------------- training


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value."""
    pad = max_shift
    background = float(x.amin())
    padded = F.pad(x, (pad, pad, pad, pad), value=background)
    offsets = torch.randint(0, 2 * pad + 1, (x.shape[0], 2), generator=generator).tolist()
    height, width = x.shape[-2:]
    return torch.stack(
        [padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)]
    )


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 3e-3,
    max_shift: int = 2,
    seed: int = SEED,
) -> None:
    """Train with AdamW + one-cycle LR and random shifts; deterministic for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    steps = (len(inputs) + batch_size - 1) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total_loss = 0.0
        for batch in order.split(batch_size):
            images = random_shift(inputs[batch], max_shift, generator)
            loss = F.cross_entropy(model(images), targets[batch], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {total_loss / len(inputs):.4f}", flush=True)
    model.eval()


def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` in eval mode."""
    with torch.no_grad():
        predictions = model.eval()(torch.from_numpy(x)).argmax(1).numpy()
    return float((predictions == y).mean())


def onnx_accuracy(path: str | Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX classifier under onnxruntime (first input, first output)."""
    input_name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    (logits,) = run_onnx(path, {input_name: x})[:1]
    return float((logits.argmax(1) == y).mean())


# --------------------------------------------------------------------------- artifacts


def write_artifacts(model: nn.Module, split: Split, out_dir: Path, seed: int) -> dict:
    """Export the model and data files into ``out_dir``; return the metadata written."""
    x_train, y_train, x_test, y_test = split
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = export_module(
        model,
        torch.from_numpy(x_test[:1]),
        out_dir / ONNX_PATH.name,
        opset=OPSET,
        input_names=("input",),
        output_names=("logits",),
        dynamic_axes=batch_axes(("input", "logits")),
    )
    x_cal, y_cal = calibration_subset(x_train, y_train, seed=seed)
    np.savez_compressed(out_dir / CALIB_PATH.name, input=x_cal, labels=y_cal)
    np.savez_compressed(out_dir / TEST_PATH.name, input=x_test, labels=y_test)
    mean, std = normalization(seed)
    meta = {
        "accuracy": onnx_accuracy(onnx_path, x_test, y_test),
        "accuracy_torch": torch_accuracy(model, x_test, y_test),
        "seed": seed,
        "dataset": "sklearn.datasets.load_digits, 8x8 -> 28x28 bilinear (align_corners=False)",
        "normalization": {"scale": 1 / 16, "mean": mean, "std": std},
        "split": {"train": len(y_train), "test": len(y_test), "calibration": len(y_cal)},
        "opset": OPSET,
        "batchnorm": "kept as BatchNormalization nodes (exported with do_constant_folding=False)",
        "features": list(FEATURES),
        "hidden": HIDDEN,
        "params": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, (1, 1, IMAGE_SIZE, IMAGE_SIZE)),
        "layers": describe(model),
        "torch_version": torch.__version__,
    }
    (out_dir / META_PATH.name).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: Sequence[str] | None = None) -> None:
    """Train the digits CNN and write its ONNX export, data files and metadata."""
    parser = argparse.ArgumentParser(prog="python -m models.digits", description=__doc__)
    parser.add_argument("-o", "--output-dir", type=Path, default=TRAINED_DIR)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=2, help="fixed for reproducibility")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    split = load_digits_split(args.seed)
    model = DigitsCNN()
    start = time.perf_counter()
    train(model, split[0], split[1], epochs=args.epochs, seed=args.seed)
    print(f"trained in {time.perf_counter() - start:.0f}s")
    meta = write_artifacts(model, split, args.output_dir, args.seed)
    print(f"test accuracy (onnxruntime): {meta['accuracy']:.4f}  ({meta['macs'] / 1e6:.1f}M MACs)")


if __name__ == "__main__":
    main()
