"""Spatial low-rank factorization of a 2-D kxk conv: a kx1 conv to r channels, then a 1xk conv
(Jaderberg et al. 2014, "scheme 2"; AIMET's Spatial SVD). Pure numpy, float64.

`W [O, C, kh, kw]` unfolded as `M [(c, i), (o, j)]` (`C·kh` rows, `O·kw` columns) factors as
`M ≈ V H`: `V [C·kh, r]` is the vertical conv (`[r, C, kh, 1]`), `H [r, O·kw]` the horizontal
one (`[O, r, 1, kw]`). The vertical conv takes the original's vertical stride, dilation and
top/bottom padding, the horizontal one the rest, so at full rank the pair is the original conv.
Data-aware inits whiten by the second moment of the vertical input patches (`C·kh`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rewriter import lowrank
from rewriter.lowrank import NormalEquations, Spectrum, Window


@dataclass(frozen=True)
class SpatialFactors:
    """`vertical [r, C, kh, 1]` then `horizontal [O, r, 1, kw]` with the original's `bias [O]`."""

    vertical: np.ndarray
    horizontal: np.ndarray
    bias: np.ndarray | None

    @property
    def rank(self) -> int:
        return int(self.vertical.shape[0])


def unfold_spatial(weight: np.ndarray) -> np.ndarray:
    """`W [O, C, kh, kw]` -> `M [C·kh, O·kw]`."""
    o, c, kh, kw = weight.shape
    return np.asarray(weight, np.float64).transpose(1, 2, 0, 3).reshape(c * kh, o * kw)


def spatial_spectrum(weight: np.ndarray, sigma: np.ndarray | None = None,
                     alpha: float = lowrank.DEFAULT_SHRINK) -> Spectrum:
    """SVD of `M` (data-free), or of `Lᵀ M` with `Σ = L Lᵀ` the vertical-patch second moment."""
    m = unfold_spatial(weight)
    if sigma is None:
        return Spectrum(*lowrank.thin_svd(m))
    shrunk = lowrank.shrink_covariance(np.asarray(sigma, np.float64), alpha, lowrank.DEFAULT_EPS)
    lower = np.linalg.cholesky(shrunk)
    u, s, vt = lowrank.thin_svd(lower.T @ m)
    return Spectrum(u, s, vt, np.linalg.inv(lower.T))


def spatial_factors(spectrum: Spectrum, rank: int, weight_shape: Sequence[int],
                    bias: np.ndarray | None) -> SpatialFactors:
    """The best rank-r pair under the spectrum's metric."""
    o, c, kh, kw = weight_shape
    u_r = spectrum.u[:, :rank]
    v = u_r if spectrum.unwhiten is None else spectrum.unwhiten @ u_r  # [C·kh, r]
    h = spectrum.s[:rank, None] * spectrum.vt[:rank]  # [r, O·kw]
    v_t, h = lowrank.balance(v.T, h)
    vertical = v_t.reshape(rank, c, kh, 1)
    horizontal = h.reshape(rank, o, kw).transpose(1, 0, 2).reshape(o, rank, 1, kw)
    return SpatialFactors(vertical, horizontal,
                          None if bias is None else np.asarray(bias, np.float64))


def spatial_reconstruct(f: SpatialFactors) -> np.ndarray:
    """The kxk kernel the pair implements (`[O, C, kh, kw]`)."""
    return np.einsum("orj,rci->ocij", f.horizontal[:, :, 0, :], f.vertical[..., 0])


def explicit_pads(window: Window, in_dims: Sequence[int], out_dims: Sequence[int]) -> list[int]:
    """ONNX pads `[top, left, bottom, right]` that reproduce the window's padding rule."""
    if window.auto_pad in ("", "NOTSET"):
        return list(window.pads)
    begin = window.pad_begin(in_dims, out_dims)
    end = []
    for size, out, k, s, d, b in zip(in_dims, out_dims, window.kernel, window.strides,
                                     window.dilations, begin, strict=True):
        end.append(max(0, (out - 1) * s + (k - 1) * d + 1 - size) - b)
    return [*begin, *end]


def split_windows(window: Window, in_dims: Sequence[int], out_dims: Sequence[int]
                  ) -> tuple[Window, Window]:
    """(vertical, horizontal) windows whose composition is `window`."""
    (kh, kw), (sh, sw), (dh, dw) = window.kernel, window.strides, window.dilations
    top, left, bottom, right = explicit_pads(window, in_dims, out_dims)
    return (Window((kh, 1), (sh, 1), (dh, 1), (top, 0, bottom, 0)),
            Window((1, kw), (1, sw), (1, dw), (0, left, 0, right)))


class PatchMoment:
    """Running second moment of the vertical input patches `[C·kh]` at sampled positions."""

    def __init__(self, window: Window, channels: int, out_dims: Sequence[int],
                 max_positions: int | None, seed: int = 0) -> None:
        self.window = window
        self.out_dims = tuple(out_dims)
        self.max_positions = max_positions
        self.rng = np.random.default_rng(seed)
        self.sum = np.zeros((channels * window.kernel[0],) * 2)
        self.rows = 0

    def add(self, x: np.ndarray) -> None:
        positions = lowrank.sample_positions(len(x), self.out_dims, self.max_positions, self.rng)
        patches = lowrank.gather_patches(np.asarray(x, np.float64), self.window, self.out_dims,
                                         positions)
        self.sum += patches.T @ patches
        self.rows += len(patches)

    def value(self) -> np.ndarray:
        return self.sum / max(self.rows, 1)


class SpatialRefit:
    """Least squares for the horizontal conv and bias with the vertical conv fixed, on the
    rewritten model's input x̂ and the original's outputs (the vertical conv is applied to the
    full kxk patches at the sampled positions, so nothing else needs capturing)."""

    def __init__(self, vertical: np.ndarray, out_channels: int, window: Window) -> None:
        self.vertical = np.asarray(vertical, np.float64)[..., 0]  # [r, C, kh]
        self.window = window
        self.out_channels = out_channels
        r, kw = self.vertical.shape[0], window.kernel[1]
        self.equations = NormalEquations(r * kw, out_channels)

    def add_rows(self, x_hat: np.ndarray, out_dims: Sequence[int], positions: np.ndarray,
                 y_rows: np.ndarray) -> None:
        patches = lowrank.gather_patches(np.asarray(x_hat, np.float64), self.window, out_dims,
                                         positions)
        r, c, kh = self.vertical.shape
        patches = patches.reshape(len(patches), c, kh, -1)
        z = np.einsum("rci,pcij->prj", self.vertical, patches).reshape(len(patches), -1)
        self.equations.add(z, np.asarray(y_rows, np.float64))

    def solve(self, ridge: float = lowrank.DEFAULT_RIDGE) -> SpatialFactors:
        w, b = self.equations.solve(ridge)
        r, c, kh = self.vertical.shape
        kw = self.window.kernel[1]
        return SpatialFactors(self.vertical.reshape(r, c, kh, 1),
                              w.reshape(self.out_channels, r, 1, kw), b)


def spatial_macs(in_shape: Sequence[int], out_shape: Sequence[int], rank: int,
                 kernel: Sequence[int]) -> int:
    """Vertical conv on `N·H'·W` positions plus horizontal conv on `N·H'·W'`."""
    n, c, _, w = in_shape
    _, o, h_out, w_out = out_shape
    return n * h_out * w * rank * c * kernel[0] + n * h_out * w_out * o * rank * kernel[1]


def spatial_full_rank(weight_shape: Sequence[int]) -> int:
    o, c, kh, kw = weight_shape
    return min(c * kh, o * kw)


__all__ = ["SpatialFactors", "spatial_spectrum", "spatial_factors", "spatial_reconstruct",
           "split_windows", "PatchMoment", "SpatialRefit", "spatial_macs", "spatial_full_rank",
           "unfold_spatial", "explicit_pads"]
