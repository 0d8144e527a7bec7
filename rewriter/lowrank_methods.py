"""The three low-rank factorizations a pass can choose per conv, behind one small interface.

- `in`: channel bottleneck, a 1x1 reduce to r channels then the kxk conv (Zhang et al. 2015).
- `in-out`: Tucker-2, 1x1 reduce, kxk core to `r_out` channels, 1x1 restore.
- `spatial`: a kx1 conv to r channels then a 1xk conv (Jaderberg et al. 2014).

Each method answers, for one `ConvLayer`: may I apply (or why not), which ranks are worth trying,
what they cost (MACs, params), which input statistic whitens its fit, its spectrum, and the
factors at a rank. Planning, fitting and emission are written once over this interface.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from rewriter import lowrank, spatial_lowrank
from rewriter.cost import conv_macs, round_rank
from rewriter.lowrank_select import ConvLayer

Factorization = lowrank.Factors | lowrank.Tucker2 | spatial_lowrank.SpatialFactors


@dataclass(frozen=True)
class Rank:
    """A planned rewrite of one layer: the method, its rank and (Tucker-2) output rank."""

    r: int
    r_out: int | None = None
    method: str = "in"

    def __str__(self) -> str:
        text = f"rank {self.r}" + (f"->{self.r_out}" if self.r_out else "")
        return text if self.method in ("in", "in-out") else f"{self.method} {text}"


class ChannelMethod:
    """`in` (reduce + kxk) or, with `tucker`, `in-out` (reduce + core + restore)."""

    def __init__(self, tucker: bool = False) -> None:
        self.tucker = tucker
        self.name = "in-out" if tucker else "in"

    def refusal(self, layer: ConvLayer) -> str | None:
        if self.tucker and layer.geometry.is_pointwise:
            return "a 1x1 kernel (Tucker-2 would add a conv for nothing)"
        return None

    def full_rank(self, layer: ConvLayer) -> int:
        return layer.channels

    def rank(self, layer: ConvLayer, r: int, multiple: int) -> Rank:
        """in-out: the output rank keeps the same share of the output channels."""
        if not self.tucker:
            return Rank(r, None, self.name)
        share = r / layer.channels
        return Rank(r, round_rank(share * layer.out_channels, multiple, layer.out_channels),
                    self.name)

    def macs_after(self, layer: ConvLayer, rank: Rank) -> int:
        reduce = conv_macs(layer.in_positions, rank.r, layer.channels, [1])
        kernel, pos, o = layer.geometry.kernel, layer.out_positions, layer.out_channels
        if rank.r_out is None:
            return reduce + conv_macs(pos, o, rank.r, kernel)
        return reduce + conv_macs(pos, rank.r_out, rank.r, kernel) + conv_macs(pos, o,
                                                                               rank.r_out, [1])

    def params_after(self, layer: ConvLayer, rank: Rank) -> int:
        k = math.prod(layer.geometry.kernel)
        o, c = layer.out_channels, layer.channels
        bias = o if layer.bias is not None else 0
        if rank.r_out is None:
            return rank.r * c + o * rank.r * k + bias
        return rank.r * c + rank.r_out * rank.r * k + o * rank.r_out + bias

    def statistic(self, layer: ConvLayer, max_positions: int | None, seed: int
                  ) -> lowrank.SecondMoment:
        return lowrank.SecondMoment(layer.channels)

    def spectrum(self, layer: ConvLayer, sigma: np.ndarray | None, shrink: float
                 ) -> lowrank.Spectrum:
        if sigma is None:
            return lowrank.svd_spectrum(layer.weight)
        return lowrank.whitened_spectrum(layer.weight, sigma, shrink)

    def factors(self, layer: ConvLayer, spectrum: lowrank.Spectrum, rank: Rank) -> Factorization:
        return channel_factors(layer, spectrum, rank)


class SpatialMethod:
    """`spatial`: kx1 to r channels, then 1xk (2-D kernels larger than 1 on both axes)."""

    name = "spatial"

    def refusal(self, layer: ConvLayer) -> str | None:
        kernel = layer.geometry.kernel
        if len(kernel) != 2 or min(kernel) < 2:
            return "not a 2-D kxk kernel (the spatial split needs kh, kw > 1)"
        return None

    def full_rank(self, layer: ConvLayer) -> int:
        return spatial_lowrank.spatial_full_rank(layer.weight.shape)

    def rank(self, layer: ConvLayer, r: int, multiple: int) -> Rank:
        return Rank(r, None, self.name)

    def macs_after(self, layer: ConvLayer, rank: Rank) -> int:
        return spatial_lowrank.spatial_macs(layer.in_shape, layer.out_shape, rank.r,
                                            layer.geometry.kernel)

    def params_after(self, layer: ConvLayer, rank: Rank) -> int:
        kh, kw = layer.geometry.kernel
        bias = layer.out_channels if layer.bias is not None else 0
        return rank.r * layer.channels * kh + layer.out_channels * rank.r * kw + bias

    def statistic(self, layer: ConvLayer, max_positions: int | None, seed: int
                  ) -> spatial_lowrank.PatchMoment:
        vertical, _ = spatial_lowrank.split_windows(layer.window, layer.in_shape[2:],
                                                    layer.out_shape[2:])
        dims = (layer.out_shape[2], layer.in_shape[3])  # the vertical conv's output map
        return spatial_lowrank.PatchMoment(vertical, layer.channels, dims, max_positions, seed)

    def spectrum(self, layer: ConvLayer, sigma: np.ndarray | None, shrink: float
                 ) -> lowrank.Spectrum:
        return spatial_lowrank.spatial_spectrum(layer.weight, sigma, shrink)

    def factors(self, layer: ConvLayer, spectrum: lowrank.Spectrum, rank: Rank) -> Factorization:
        return spatial_lowrank.spatial_factors(spectrum, rank.r, layer.weight.shape, layer.bias)


def channel_factors(layer: ConvLayer, spectrum: lowrank.Spectrum, rank: Rank) -> Factorization:
    """`in` from the spectrum; `in-out` by Tucker-2 ALS under the input moment when there is
    one; with the input mean, the bias that removes the mean output shift."""
    if rank.r_out is not None and spectrum.moment is not None and lowrank.DEFAULT_ALS_ITERS:
        f: Factorization = lowrank.tucker2_als(layer.weight, spectrum.moment, rank.r,
                                               rank.r_out, layer.bias, alpha=0.0).tucker
    else:
        f = spectrum.factors(rank.r, layer.out_channels, layer.geometry.kernel, layer.bias)
        f = f if rank.r_out is None else lowrank.restore_outputs(f, rank.r_out)
    if spectrum.mean is None or not lowrank.BIAS_CORRECTION:
        return f
    full = (lowrank.tucker2_reconstruct(f) if isinstance(f, lowrank.Tucker2)
            else lowrank.reconstruct(f))
    return replace(f, bias=lowrank.corrected_bias(layer.weight, full, layer.bias, spectrum.mean))


Method = ChannelMethod | SpatialMethod

METHODS: dict[str, Method] = {"in": ChannelMethod(), "in-out": ChannelMethod(tucker=True),
                              "spatial": SpatialMethod()}


def method_named(name: str) -> Method:
    return METHODS[name]


def spectrum_key(rank_or_method: Rank | str) -> str:
    """Spectra are shared by `in` and `in-out` (same unfolding, same input statistic)."""
    name = rank_or_method.method if isinstance(rank_or_method, Rank) else rank_or_method
    return "spatial" if name == "spatial" else "channel"


def rank_grid(layer: ConvLayer, method: Method, multiple: int) -> list[Rank]:
    """Allowed ranks below full that save MACs, largest first."""
    out = []
    for r in reversed(lowrank.candidate_ranks(method.full_rank(layer), multiple)):
        rank = method.rank(layer, r, multiple)
        if method.macs_after(layer, rank) < layer.macs:
            out.append(rank)
    return out
