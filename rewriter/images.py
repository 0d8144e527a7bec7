"""`--calib DIR`: a folder of images turned into model inputs with `--preprocess`.

`--preprocess size=224,mean=0.485+0.456+0.406,std=0.229+0.224+0.225,layout=NCHW,color=rgb`
(the one `key=value` grammar of `rewriter.options`; `PreprocessOptions` lists every key).
Pixels are scaled by `scale` (default 1/255), then `(x - mean) / std` per channel.
`resize=stretch` (default) resizes to the size exactly; `resize=crop` scales the shorter side
and takes the centre. Without `size` the model's static H and W are used. Files are read in
sorted order, so the same folder gives the same samples. A folder whose images sit in
sub-folders is read as a labelled set (label = sub-folder index in sorted order, as
torchvision's ImageFolder does), so accuracy can be measured.

Decoding uses Pillow when installed, else OpenCV (which rapidocr brings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from rewriter.errors import CalibrationError, OptionError
from rewriter.options import option, parse_options, parse_pairs

if TYPE_CHECKING:
    from rewriter.calibration import CalibrationSet, InputSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class Preprocess:
    """How an image becomes one sample of a model input."""

    size: tuple[int, int] | None = None  # (H, W); None: from the model
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    scale: float = 1.0 / 255.0
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    resize: Literal["stretch", "crop"] = "stretch"
    limit: int | None = None  # read at most this many images


@dataclass
class PreprocessOptions:
    """`--preprocess` keys, in the one `key=value` grammar (`rewriter.options`)."""

    size: list[int] = option([], "H+W, or one number for a square (default: the model's H, W)",
                             ge=1)
    mean: list[float] = option([0.0], "per-channel mean subtracted after scaling (r+g+b)",
                               signed=True)
    std: list[float] = option([1.0], "per-channel std divided by (r+g+b)", gt=0)
    scale: float = option(1.0 / 255.0, "pixel scale applied first", gt=0)
    layout: Literal["NCHW", "NHWC"] = option("NCHW", "channel layout of the model input")
    color: Literal["rgb", "bgr", "gray"] = option("rgb", "channel order, or one gray channel")
    resize: Literal["stretch", "crop"] = option(
        "stretch", "stretch to the size, or scale the shorter side and take the centre"
    )
    limit: int | None = option(None, "read at most this many images", ge=1)


def parse_preprocess(spec: str | Mapping[str, Any] | Preprocess | None) -> Preprocess:
    """`size=224,mean=0.485+0.456+0.406,...` (or a mapping, e.g. TOML) -> Preprocess."""
    if isinstance(spec, Preprocess):
        return spec
    raw = parse_pairs(spec, "preprocess") if spec is None or isinstance(spec, str) else spec
    values: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key).lower()
        if isinstance(value, str):
            value = value.replace("/", "+")
            if key == "size":
                value = value.replace("x", "+")
            elif key == "layout":
                value = value.upper()
            elif key in ("color", "resize"):
                value = value.lower()
        if key == "size" and isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        values[key] = value
    opts = parse_options(PreprocessOptions, values, "preprocess")
    if len(opts.size) > 2:
        raise OptionError(f"preprocess: size takes H+W or one number, got {len(opts.size)}")
    size = None if not opts.size else (opts.size[0], opts.size[-1])
    return Preprocess(size, opts.mean, opts.std, opts.scale, opts.layout, opts.color,
                      opts.resize, opts.limit)


def list_images(folder: Path) -> tuple[list[Path], list[int] | None]:
    """Image files in sorted order, and labels when they are grouped in class sub-folders."""
    direct = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if direct or not classes:
        return direct, None
    files, labels = [], []
    for index, sub in enumerate(classes):
        for path in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            files.append(path)
            labels.append(index)
    return files, labels


def load_image_folder(
    folder: str | Path, specs: Sequence[InputSpec], preprocess: str | Mapping | None
) -> CalibrationSet:
    """The images of `folder` as samples of the model's single image input."""
    from rewriter.calibration import CalibrationSet

    folder = Path(folder)
    if len(specs) != 1:
        raise CalibrationError(
            f"--calib {folder}: an image folder serves single-input models; this one has inputs "
            f"{[s.name for s in specs]} (use a .npz keyed by input name)"
        )
    spec = specs[0]
    if len(spec.shape) != 4:
        raise CalibrationError(
            f"--calib {folder}: input '{spec.name}' has rank {len(spec.shape)}; images need rank 4"
        )
    p = parse_preprocess(preprocess)
    size = p.size or _model_size(spec, p.layout)
    if size is None:
        raise CalibrationError(
            f"--calib {folder}: input '{spec.name}' has dynamic height/width; "
            "give --preprocess size=H,W"
        )
    _check_channels(spec, p, folder)
    files, labels = list_images(folder)
    if p.limit is not None:
        files = files[: p.limit]
        labels = labels[: p.limit] if labels is not None else None
    if not files:
        raise CalibrationError(f"--calib {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    decode = _decoder()
    samples = [_to_sample(decode(path, p.color), size, p) for path in files]
    array = np.stack(samples)
    if np.issubdtype(spec.dtype, np.integer):
        array = np.clip(np.round(array), 0, 255)
    return CalibrationSet(
        {spec.name: array.astype(spec.dtype)},
        None if labels is None else np.asarray(labels, dtype=np.int64),
        str(folder),
        synthetic=False,
    )


def _model_size(spec: InputSpec, layout: str) -> tuple[int, int] | None:
    h, w = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    return (h, w) if h is not None and w is not None else None


def _check_channels(spec: InputSpec, p: Preprocess, folder: Path) -> None:
    channels = spec.shape[1] if p.layout == "NCHW" else spec.shape[3]
    want = 1 if p.color == "gray" else 3
    if channels is not None and channels != want:
        raise CalibrationError(
            f"--calib {folder}: input '{spec.name}' has {channels} channels in layout {p.layout}, "
            f"color={p.color} gives {want} (set --preprocess color=... or layout=...)"
        )


def _to_sample(pixels: np.ndarray, size: tuple[int, int], p: Preprocess) -> np.ndarray:
    """HxWxC uint8 -> one normalised sample in the requested layout (float32)."""
    pixels = _resize(pixels, size, p.resize)
    x = pixels.astype(np.float32) * np.float32(p.scale)
    channels = x.shape[2]
    mean = np.asarray(p.mean if len(p.mean) == channels else p.mean[:1] * channels, np.float32)
    std = np.asarray(p.std if len(p.std) == channels else p.std[:1] * channels, np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1) if p.layout == "NCHW" else x)


def _resize(pixels: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    h, w = size
    if mode == "crop":
        scale = max(h / pixels.shape[0], w / pixels.shape[1])
        rh, rw = max(h, round(pixels.shape[0] * scale)), max(w, round(pixels.shape[1] * scale))
        pixels = _resize_exact(pixels, rh, rw)
        top, left = (rh - h) // 2, (rw - w) // 2
        return pixels[top : top + h, left : left + w]
    return _resize_exact(pixels, h, w)


def _decoder():
    """Pillow if installed, else OpenCV, else a clear error."""
    try:
        from PIL import Image

        def read_pil(path: Path, color: str) -> np.ndarray:
            try:
                with Image.open(path) as image:
                    mode = "L" if color == "gray" else "RGB"
                    pixels = np.asarray(image.convert(mode))
            except Exception as exc:
                raise CalibrationError(f"--calib: cannot read image {path} ({exc})") from None
            pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
            return pixels[:, :, ::-1] if color == "bgr" else pixels

        return read_pil
    except ImportError:
        pass
    try:
        import cv2
    except ImportError:
        raise CalibrationError(
            "calibration from an image folder needs Pillow: pip install 'onexone[images]'"
        ) from None

    def read_cv2(path: Path, color: str) -> np.ndarray:
        flag = cv2.IMREAD_GRAYSCALE if color == "gray" else cv2.IMREAD_COLOR
        pixels = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), flag)
        if pixels is None:
            raise CalibrationError(f"--calib: cannot read image {path}")
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        return pixels[:, :, ::-1] if color == "rgb" else pixels

    return read_cv2


def _resize_exact(pixels: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize with Pillow or OpenCV (whichever decodes), keeping HxWxC uint8."""
    if pixels.shape[:2] == (h, w):
        return pixels
    try:
        from PIL import Image

        channels = [
            np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, c])).resize(
                (w, h), Image.Resampling.BILINEAR))
            for c in range(pixels.shape[2])
        ]
        return np.stack(channels, axis=2)
    except ImportError:
        import cv2

        out = cv2.resize(pixels, (w, h), interpolation=cv2.INTER_LINEAR)
        return out[:, :, None] if out.ndim == 2 else out
