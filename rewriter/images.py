"""`--calib DIR`: a folder of images turned into model inputs with `--preprocess`.

`--preprocess size=224,mean=0.485+0.456+0.406,std=0.229+0.224+0.225,layout=NCHW,color=rgb`
(the one `key=value` grammar of `rewriter.options`; `PreprocessOptions` lists every key).
Pixels are scaled by `scale` (default 1/255), then `(x - mean) / std` per channel.
`resize=stretch` (default) resizes to the size exactly; `resize=crop` scales the shorter side
and takes the centre; `resize=letterbox` keeps the aspect and pads with grey 114 (YOLO's
preprocessing). Without `size` the model's static H and W are used. Files are read in sorted
order, so the same folder gives the same samples. A folder whose images sit in sub-folders is
read as a labelled set (label = sub-folder index in sorted order, as torchvision's ImageFolder
does), so accuracy can be measured.

`augment=flip+scale` multiplies the samples (every combination of a horizontal flip and a
seeded scale jitter of ±`jitter`, default 0.25; `seed=` picks the draws). Augmented copies
only ever go to the fitting split: the held-out split is whole original images none of whose
copies were fitted on. Samples are decoded when a batch is read, so a folder of hundreds of
images never sits in memory as float arrays; resized pixels are kept in a uint8 cache of at
most `cache` MiB (default 256) so repeated capture runs do not decode again.

Decoding uses Pillow when installed, else OpenCV (which rapidocr brings).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from rewriter.calibration import CalibrationSet
from rewriter.errors import CalibrationError, OptionError
from rewriter.options import option, parse_options, parse_pairs

if TYPE_CHECKING:
    from rewriter.calibration import InputSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
RESIZE_MODES = ("stretch", "crop", "letterbox")
AUGMENTS = ("flip", "scale")
PAD_VALUE = 114  # YOLO's letterbox grey


@dataclass
class Preprocess:
    """How an image becomes one sample of a model input."""

    size: tuple[int, int] | None = None  # (H, W); None: from the model
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    scale: float = 1.0 / 255.0
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    resize: Literal["stretch", "crop", "letterbox"] = "stretch"
    limit: int | None = None  # read at most this many images
    augment: tuple[str, ...] = ()  # of "flip", "scale"
    jitter: float = 0.25  # scale jitter: factors drawn from [1 - jitter, 1 + jitter]
    seed: int = 0
    cache_mib: float = 256.0  # resized uint8 pixels kept between reads


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
    resize: Literal["stretch", "crop", "letterbox"] = option(
        "stretch", "stretch to the size, scale the shorter side and take the centre (crop), or "
                   "keep the aspect and pad with grey 114 (letterbox, YOLO's preprocessing)"
    )
    limit: int | None = option(None, "read at most this many images", ge=1)
    augment: list[str] = option([], "multiply the fitting samples: flip, scale or flip+scale")
    jitter: float = option(0.25, "scale jitter: factors drawn from [1 - jitter, 1 + jitter]",
                           ge=0, lt=1)
    seed: int = option(0, "seed of the augmentation draws", ge=0)
    cache: float = option(256.0, "MiB of resized uint8 pixels kept between reads (0: none)",
                         ge=0)


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
    try:
        augment = _parse_augment("+".join(opts.augment))
    except ValueError as exc:
        raise OptionError(f"preprocess: {exc}") from None
    size = None if not opts.size else (opts.size[0], opts.size[-1])
    return Preprocess(size, opts.mean, opts.std, opts.scale, opts.layout, opts.color,
                      opts.resize, opts.limit, augment, opts.jitter, opts.seed, opts.cache)


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
    """The images of `folder` as samples of the model's single image input (read lazily,
    batch by batch; every file's header is checked here, before any work)."""
    folder = Path(folder)
    if len(specs) != 1:
        raise CalibrationError(
            f"calib {folder}: an image folder serves single-input models; this one has inputs "
            f"{[s.name for s in specs]} (use a .npz keyed by input name)"
        )
    spec = specs[0]
    if len(spec.shape) != 4:
        raise CalibrationError(
            f"calib {folder}: input '{spec.name}' has rank {len(spec.shape)}; images need rank 4"
        )
    p = parse_preprocess(preprocess)
    size = p.size or _model_size(spec, p.layout)
    if size is None:
        raise CalibrationError(
            f"calib {folder}: input '{spec.name}' has dynamic height/width; "
            "give --preprocess size=H+W (or size=S for a square, e.g. size=640)"
        )
    _check_channels(spec, p, folder)
    files, labels = list_images(folder)
    if p.limit is not None:
        files = files[: p.limit]
        labels = labels[: p.limit] if labels is not None else None
    if not files:
        raise CalibrationError(f"calib {folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    _check_readable(files)
    return ImageCalibrationSet.from_files(files, labels, spec, size, p, str(folder))


def _check_readable(files: Sequence[Path]) -> None:
    """Open each file's header (Pillow reads no pixels for this) so a broken image is named
    up front rather than mid-run; without Pillow the first read reports it."""
    try:
        from PIL import Image
    except ImportError:
        return
    for path in files:
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 - parsing the header is the check
        except Exception as exc:
            raise CalibrationError(f"calib: cannot read image {path} ({exc})") from None


def _parse_augment(text: str) -> tuple[str, ...]:
    names = tuple(sorted({t.strip().lower() for t in text.split("+") if t.strip()}))
    bad = [n for n in names if n not in AUGMENTS and n != "none"]
    if bad:
        raise ValueError(f"augment={text}: unknown {bad} (use flip, scale or flip+scale)")
    return tuple(n for n in names if n != "none")


@dataclass(frozen=True)
class SampleSpec:
    """One sample: which file, flipped or not, and its scale-jitter factor."""

    path: Path
    image: int  # index of the source image
    flip: bool = False
    scale: float = 1.0

    @property
    def augmented(self) -> bool:
        return self.flip or self.scale != 1.0


def expand_samples(files: Sequence[Path], p: Preprocess) -> list[SampleSpec]:
    """Every file, times every combination of the requested augmentations (seeded)."""
    rng = np.random.default_rng(p.seed)
    flips = (False, True) if "flip" in p.augment else (False,)
    jitters = (False, True) if "scale" in p.augment and p.jitter > 0 else (False,)
    out = []
    for index, path in enumerate(files):
        for flip in flips:
            for jitter in jitters:
                scale = float(rng.uniform(1 - p.jitter, 1 + p.jitter)) if jitter else 1.0
                out.append(SampleSpec(path, index, flip, scale))
    return out


class _PixelCache:
    """Resized uint8 pixels by sample, least recently used dropped past a byte budget."""

    def __init__(self, budget_bytes: float) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.items: OrderedDict[SampleSpec, np.ndarray] = OrderedDict()
        self.decodes = 0

    def get(self, spec: SampleSpec, make) -> np.ndarray:
        hit = self.items.get(spec)
        if hit is not None:
            self.items.move_to_end(spec)
            return hit
        pixels = make()
        self.decodes += 1
        if pixels.nbytes <= self.budget:
            self.items[spec] = pixels
            self.used += pixels.nbytes
            while self.used > self.budget:
                _, old = self.items.popitem(last=False)
                self.used -= old.nbytes
        return pixels


class ImageSamples:
    """An array-like of image samples `[N, C, H, W]` (or NHWC) decoded when read.

    Slices and integers give numpy arrays (one batch in memory); an index array gives another
    lazy view (`CalibrationSet.subset` keeps streaming); `np.asarray` materialises all of it
    for the few consumers that want everything at once.
    """

    def __init__(self, specs: Sequence[SampleSpec], size: tuple[int, int], p: Preprocess,
                 dtype: np.dtype, cache: _PixelCache | None = None) -> None:
        self.specs = list(specs)
        self.size = size
        self.preprocess = p
        self.dtype = np.dtype(dtype)
        self.cache = cache if cache is not None else _PixelCache(p.cache_mib * 2**20)
        self._decode = _decoder()
        channels = 1 if p.color == "gray" else 3
        h, w = size
        self.sample_shape = (channels, h, w) if p.layout == "NCHW" else (h, w, channels)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.specs), *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    def __len__(self) -> int:
        return len(self.specs)

    def _sample(self, spec: SampleSpec) -> np.ndarray:
        pixels = self.cache.get(spec, lambda: _pixels(
            self._decode(spec.path, self.preprocess.color), self.size, self.preprocess, spec))
        x = _normalise(pixels, self.preprocess)
        if np.issubdtype(self.dtype, np.integer):
            x = np.clip(np.round(x), 0, 255)
        return x.astype(self.dtype)

    def _read(self, specs: Sequence[SampleSpec]) -> np.ndarray:
        out = np.empty((len(specs), *self.sample_shape), self.dtype)
        for i, spec in enumerate(specs):
            out[i] = self._sample(spec)
        return out

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._read([self.specs[int(key)]])[0]
        if isinstance(key, slice):
            return self._read(self.specs[key])
        index = np.asarray(key)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return ImageSamples([self.specs[int(i)] for i in index.reshape(-1)], self.size,
                            self.preprocess, self.dtype, self.cache)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self._read(self.specs)
        return array if dtype is None else array.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self, dtype=dtype)


@dataclass
class ImageCalibrationSet(CalibrationSet):
    """A calibration set read from image files: knows which source image each sample is, so
    the held-out split holds whole, un-augmented images none of whose copies were fitted on."""

    images: int = 0

    @classmethod
    def from_files(cls, files: Sequence[Path], labels: Sequence[int] | None, spec: InputSpec,
                   size: tuple[int, int], p: Preprocess, source: str) -> ImageCalibrationSet:
        specs = expand_samples(files, p)
        per_sample = None if labels is None else np.asarray(
            [labels[s.image] for s in specs], dtype=np.int64)
        described = f"{source} ({len(files)} images"
        if p.augment:
            described += f" x{len(specs) // max(len(files), 1)} augment={'+'.join(p.augment)}"
        described += f", resize={p.resize})"
        return cls({spec.name: ImageSamples(specs, size, p, spec.dtype)}, per_sample, described,
                   synthetic=False, images=len(files))

    def _samples(self) -> ImageSamples | None:
        array = next(iter(self.inputs.values()), None)
        return array if isinstance(array, ImageSamples) else None

    def subset(self, index: np.ndarray) -> ImageCalibrationSet:
        sub = super().subset(index)
        samples = sub.inputs and next(iter(sub.inputs.values()))
        images = len({s.image for s in samples.specs}) if isinstance(samples, ImageSamples) else 0
        return ImageCalibrationSet(sub.inputs, sub.labels, sub.source, sub.synthetic, images)

    def split(self, holdout: float = 0.25, seed: int = 0
              ) -> tuple[CalibrationSet, CalibrationSet]:
        """Split by source image (seeded); held out: the originals of the held-out images."""
        samples = self._samples()
        if samples is None:
            return super().split(holdout, seed)
        image_of = np.asarray([s.image for s in samples.specs])
        unique = np.unique(image_of)
        if len(unique) < 2:
            return super().split(holdout, seed)
        order = np.random.default_rng(seed).permutation(unique)
        n_hold = min(max(1, int(round(len(unique) * holdout))), len(unique) - 1)
        held = np.isin(image_of, order[:n_hold])
        plain = np.asarray([not s.augmented for s in samples.specs])
        return self.subset(np.flatnonzero(~held)), self.subset(np.flatnonzero(held & plain))


def _model_size(spec: InputSpec, layout: str) -> tuple[int, int] | None:
    h, w = (spec.shape[2], spec.shape[3]) if layout == "NCHW" else (spec.shape[1], spec.shape[2])
    return (h, w) if h is not None and w is not None else None


def _check_channels(spec: InputSpec, p: Preprocess, folder: Path) -> None:
    channels = spec.shape[1] if p.layout == "NCHW" else spec.shape[3]
    want = 1 if p.color == "gray" else 3
    if channels is not None and channels != want:
        raise CalibrationError(
            f"calib {folder}: input '{spec.name}' has {channels} channels in layout {p.layout}, "
            f"color={p.color} gives {want} (set --preprocess color=... or layout=...)"
        )


def _normalise(pixels: np.ndarray, p: Preprocess) -> np.ndarray:
    """HxWxC uint8 at the final size -> one normalised sample in the requested layout."""
    x = pixels.astype(np.float32) * np.float32(p.scale)
    channels = x.shape[2]
    mean = np.asarray(p.mean if len(p.mean) == channels else p.mean[:1] * channels, np.float32)
    std = np.asarray(p.std if len(p.std) == channels else p.std[:1] * channels, np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1) if p.layout == "NCHW" else x)


def _to_sample(pixels: np.ndarray, size: tuple[int, int], p: Preprocess) -> np.ndarray:
    """HxWxC uint8 -> one normalised sample in the requested layout (float32)."""
    return _normalise(_resize(pixels, size, p.resize), p)


def _pixels(pixels: np.ndarray, size: tuple[int, int], p: Preprocess,
            spec: SampleSpec) -> np.ndarray:
    """A decoded image as the sample `spec` asks: flipped, resized for a canvas of `scale`
    times the size, then centred on the size (cropped or padded with grey)."""
    if spec.flip:
        pixels = pixels[:, ::-1]
    if spec.scale == 1.0:
        return _resize(pixels, size, p.resize)
    canvas = (max(1, round(size[0] * spec.scale)), max(1, round(size[1] * spec.scale)))
    return _centre(_resize(pixels, canvas, p.resize), size)


def _centre(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop or pad (grey) `pixels` symmetrically to exactly `size`."""
    out = np.full((*size, pixels.shape[2]), PAD_VALUE, np.uint8)
    src, dst = [], []
    for have, want in zip(pixels.shape[:2], size, strict=True):
        if have >= want:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
        else:
            start = (want - have) // 2
            src.append(slice(0, have))
            dst.append(slice(start, start + have))
    out[dst[0], dst[1]] = pixels[src[0], src[1]]
    return out


def _resize(pixels: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    h, w = size
    if mode == "crop":
        scale = max(h / pixels.shape[0], w / pixels.shape[1])
        rh, rw = max(h, round(pixels.shape[0] * scale)), max(w, round(pixels.shape[1] * scale))
        pixels = _resize_exact(pixels, rh, rw)
        top, left = (rh - h) // 2, (rw - w) // 2
        return pixels[top : top + h, left : left + w]
    if mode == "letterbox":
        scale = min(h / pixels.shape[0], w / pixels.shape[1])
        rh = min(h, max(1, round(pixels.shape[0] * scale)))
        rw = min(w, max(1, round(pixels.shape[1] * scale)))
        return _centre(_resize_exact(pixels, rh, rw), size)
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
                raise CalibrationError(f"calib: cannot read image {path} ({exc})") from None
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
            raise CalibrationError(f"calib: cannot read image {path}")
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
