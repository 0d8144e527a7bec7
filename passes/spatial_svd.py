"""`spatial-svd`: a kxk conv becomes a kx1 conv to r channels, then a 1xk conv.

Jaderberg, Vedaldi and Zisserman 2014 ("scheme 2"), AIMET's Spatial SVD: the kernel unfolded as
`[(c, i), (o, j)]` (`C·kh` by `O·kw`) is factored at rank r (`rewriter.spatial_lowrank`). The kx1
conv takes the vertical stride, dilation and top/bottom padding, the 1xk conv the horizontal
ones (auto_pad resolved to explicit pads from the known shapes), so at full rank the pair is the
original conv. Selection, rank options (ratio of the full rank `min(C·kh, O·kw)`, rank, energy,
target, target=auto), svd / whitened / refit inits, measurements and the report are the shared
low-rank parts (`passes.lowrank_pass`).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from passes import register
from passes.base import RewritePass
from passes.lowrank_pass import LowRankOptions, measures_on_holdout, run_lowrank
from rewriter.lowrank_methods import METHODS


@dataclass
class SpatialSvdOptions(LowRankOptions):
    """The shared low-rank options; `ratio` is a share of the full spatial rank."""


@register
class SpatialSvdPass(RewritePass):
    name = "spatial-svd"
    summary = "kxk conv split into kx1 (to r channels) then 1xk, factorized from the weights"
    Options = SpatialSvdOptions
    exact = False

    def chooses_on_holdout(self) -> bool:
        return measures_on_holdout(self.options, 1)  # type: ignore[arg-type]

    def apply(self, model: ir.Model) -> None:
        run_lowrank(model, self.options, self.context, self.report, self.name,  # type: ignore
                    [METHODS["spatial"]], "a kx1 + 1xk split", "spatial")


__all__ = ["SpatialSvdOptions", "SpatialSvdPass"]
