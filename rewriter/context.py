"""What a pass may use beyond the graph: calibration data, activation capture, a seed, progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from rewriter.calibration import CalibrationSet


@dataclass
class PassContext:
    """Shared by the passes of one run. `fit` trains weights; `holdout` only measures fidelity."""

    fit: CalibrationSet | None = None
    holdout: CalibrationSet | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 32
    log: Callable[[str], None] = lambda message: None

    @property
    def has_data(self) -> bool:
        return self.fit is not None and self.fit.n > 0

    @property
    def synthetic(self) -> bool:
        return self.fit is not None and self.fit.synthetic

    def capture(
        self, model: ir.Model, names: Sequence[str], split: str = "fit"
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of the named intermediate values of `model` over a calibration split."""
        from rewriter import runtime

        data = self.fit if split == "fit" else self.holdout
        if data is None:
            raise ValueError("no calibration data: pass --calib")
        return runtime.capture(
            model, names, data.inputs, self.batch_size, label=f"calibration ({split})"
        )
