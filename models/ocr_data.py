"""Deterministic synthetic "document" pages rendered with real fonts, for judging OCR rewrites.

The PP-OCR models shipped with rapidocr-onnxruntime are trained detectors and recognisers; the
only honest way to judge a lossy rewrite of them is to run the whole OCR pipeline on real
glyphs and compare what it reads. Pages here are drawn with scalable fonts that ship with the
dev dependencies (Pillow's bundled font and matplotlib's DejaVu/STIX fonts), so the same seed
gives the same pixels on every machine and nothing needs to be downloaded or apt-installed.

A page is a light, slightly noisy background with several lines of seeded English words and
numbers in various fonts and sizes; each line's text and pixel box are kept as ground truth.
`det_input(image)` preprocesses a page exactly as rapidocr's text detector does (its own
`DetPreProcess`), and `det_calibration(...)` stacks such inputs for `--calib` (key "x").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

#: Side of a rendered page. rapidocr's detector scales the shorter side up to 736 (limit_type
#: "min") and rounds to multiples of 32, so a 736x736 page reaches the model unresampled.
PAGE_SIZE = 736

#: Seeds of the evaluation pages start here; calibration pages use a disjoint range.
EVAL_SEED_BASE = 10_000
CALIB_SEED_BASE = 90_000

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use each which she "
    "do how their if will up other about out many then them these so some her would make like "
    "him into time has look two more write go see number way could people my than first water "
    "been call who oil its now find long down day did get come made may part over new sound "
    "take only little work know place year live me back give most very after thing our just "
    "name good sentence man think say great where help through much before line right too mean "
    "old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land "
    "different home us move try kind hand picture again change off play spell air away animal "
    "house point page letter mother answer found study still learn should world high every near "
    "add food between own below country plant last school father keep tree never start city "
    "earth eye light thought head under story saw left few while along might close something "
    "seem next hard open example begin life always those both paper together got group often "
    "run important until children side feet car mile night walk white sea began grow took river "
    "four carry state once book hear stop without second later miss idea enough eat face watch "
    "far Indian real almost let above girl sometimes mountain cut young talk soon list song "
    "being leave family invoice total amount date order account balance payment customer "
    "address street office report summary quantity price item delivery receipt"
).split()

MATPLOTLIB_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "STIXGeneral.ttf",
)


@dataclass(frozen=True)
class FontSpec:
    """A scalable font by name; `load(size)` returns a Pillow FreeType font."""

    name: str
    path: str | None  # None: Pillow's bundled font (ImageFont.load_default(size=...))

    def load(self, size: int) -> ImageFont.FreeTypeFont:
        return _load_font(self.path, size)


@lru_cache(maxsize=256)
def _load_font(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    if path is None:
        font = ImageFont.load_default(size=size)
        if not isinstance(font, ImageFont.FreeTypeFont):
            raise RuntimeError("Pillow without FreeType: ImageFont.load_default(size=) is a bitmap")
        return font
    return ImageFont.truetype(path, size)


def bundled_fonts() -> list[FontSpec]:
    """Pillow's bundled scalable font plus matplotlib's bundled fonts that are present."""
    fonts = [FontSpec("pillow-default", None)]
    try:
        import matplotlib
    except ImportError:  # matplotlib is in the dev extra; Pillow's font alone still works
        return fonts
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts += [
        FontSpec(Path(n).stem, str(folder / n)) for n in MATPLOTLIB_FONTS if (folder / n).exists()
    ]
    return fonts


@dataclass
class TextLine:
    """Ground truth for one rendered line: its text and axis-aligned box (x0, y0, x1, y1)."""

    text: str
    box: tuple[int, int, int, int]
    font: str
    size: int


@dataclass
class Page:
    """A rendered page (H x W x 3 uint8, BGR order as rapidocr expects arrays) and its lines."""

    seed: int
    image: np.ndarray
    lines: list[TextLine]


def _token(rng: random.Random) -> str:
    """A word (sometimes capitalised) or a number in one of the shapes documents use."""
    roll = rng.random()
    if roll < 0.72:
        word = rng.choice(WORDS)
        return word.capitalize() if rng.random() < 0.2 else word
    if roll < 0.82:
        return str(rng.randint(0, 99999))
    if roll < 0.90:
        return f"{rng.randint(1, 9999)}.{rng.randint(0, 99):02d}"
    if roll < 0.96:
        return f"{rng.randint(1, 28):02d}-{rng.randint(1, 12):02d}-{rng.randint(1990, 2030)}"
    return f"No.{rng.randint(10, 9999)}"


def _line_text(rng: random.Random, max_width: int, font: ImageFont.FreeTypeFont) -> str:
    """Seeded tokens joined by spaces, as many as fit (at least one) in `max_width` pixels."""
    words = [_token(rng)]
    for _ in range(rng.randint(1, 7)):
        candidate = " ".join([*words, _token(rng)])
        if font.getlength(candidate) > max_width:
            break
        words.append(candidate.rsplit(" ", 1)[1])
    return " ".join(words)


def render_page(seed: int, size: int = PAGE_SIZE, fonts: Sequence[FontSpec] | None = None) -> Page:
    """One page: 4-12 lines, each in its own font (size 16-40 px), dark ink on a light tint."""
    rng = random.Random(seed)
    fonts = list(fonts or bundled_fonts())
    background = tuple(rng.randint(228, 255) for _ in range(3))
    canvas = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(canvas)
    lines: list[TextLine] = []
    y = rng.randint(12, 40)
    while len(lines) < 12:
        spec = rng.choice(fonts)
        font_size = rng.randint(16, 40)
        font = spec.load(font_size)
        x = rng.randint(16, 80)
        text = _line_text(rng, size - x - 16, font)
        x0, y0, x1, y1 = draw.textbbox((x, y), text, font=font)
        if y1 > size - 12:
            break
        if x1 > size - 8:  # a single long token wider than the page: drop the line
            continue
        ink = tuple(rng.randint(0, 70) for _ in range(3))
        draw.text((x, y), text, font=font, fill=ink)
        lines.append(TextLine(text, (x0, y0, x1, y1), spec.name, font_size))
        y = y1 + int(font_size * rng.uniform(0.6, 1.4))
    if rng.random() < 0.5:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.7)))
    pixels = np.asarray(canvas, dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, rng.uniform(2.0, 6.0), pixels.shape)
    rgb = np.clip(pixels + noise, 0, 255).astype(np.uint8)
    return Page(seed, np.ascontiguousarray(rgb[:, :, ::-1]), lines)


def eval_pages(n: int, size: int = PAGE_SIZE) -> list[Page]:
    """The `n` evaluation pages (seeds EVAL_SEED_BASE...)."""
    return [render_page(EVAL_SEED_BASE + i, size) for i in range(n)]


def det_preprocessor() -> Callable[[np.ndarray], np.ndarray]:
    """rapidocr's own detector preprocessing with its default config (resize, normalise, NCHW)."""
    import rapidocr_onnxruntime
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess
    from rapidocr_onnxruntime.utils import read_yaml

    config = read_yaml(str(Path(rapidocr_onnxruntime.__file__).parent / "config.yaml"))["Det"]
    if config["limit_type"] != "min":
        raise RuntimeError(f"rapidocr det limit_type {config['limit_type']!r}: expected 'min'")
    return DetPreProcess(config["limit_side_len"], "min", config["mean"], config["std"])


def det_input(image: np.ndarray) -> np.ndarray:
    """The detector input (1, 3, H, W) float32 that rapidocr builds for this page."""
    return det_preprocessor()(image)


def det_calibration(n: int, size: int = PAGE_SIZE) -> dict[str, np.ndarray]:
    """`n` calibration pages (disjoint seeds from the evaluation pages) as {"x": (n,3,H,W)}."""
    prep = det_preprocessor()
    arrays = [prep(render_page(CALIB_SEED_BASE + i, size).image) for i in range(n)]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise RuntimeError(f"calibration pages preprocess to several shapes: {sorted(shapes)}")
    return {"x": np.concatenate(arrays, axis=0)}


def save_det_calibration(path: str | Path, n: int, size: int = PAGE_SIZE) -> Path:
    """Write `det_calibration(n)` as an npz usable as `rewrite ... --calib PATH`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **det_calibration(n, size))
    return path
