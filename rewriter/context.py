"""What a pass may use beyond the graph: calibration data, activation capture, a seed, progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from rewriter import runtime
from rewriter.calibration import CalibrationSet
from rewriter.groups import OutputGroup

#: Fewest held-out samples a choice such as target=auto is made on, unless lowered explicitly.
DEFAULT_MIN_SAMPLES = 16


@dataclass
class PassContext:
    """Shared by the passes of one run. `fit` trains weights; `holdout` only measures fidelity."""

    fit: CalibrationSet | None = None
    holdout: CalibrationSet | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 32
    log: Callable[[str], None] = lambda message: None
    #: Run facts the pipeline already has, so passes need not recompute them: the model as it
    #: entered the current pass (a snapshot no one edits) and its outputs on `holdout.inputs`.
    before: ir.Model | None = None
    reference: dict[str, np.ndarray] | None = None
    #: Output groups fidelity is measured on (found from the original's outputs, or given).
    groups: list[OutputGroup] = field(default_factory=list)
    #: Fewest `holdout` samples a pass may choose on (`--min-samples`).
    min_samples: int = DEFAULT_MIN_SAMPLES
    #: The user's metric (`rewriter.usermetric.LoadedMetric`) and the original's value of it.
    metric: Any = None
    metric_baseline: Any = None
    #: Largest drop of the metric's primary value a choice may accept (`--max-drop`).
    max_drop: float | None = None

    @property
    def has_data(self) -> bool:
        return self.fit is not None and self.fit.n > 0

    @property
    def synthetic(self) -> bool:
        return self.fit is not None and self.fit.synthetic

    def holdout_reference(self, model: ir.Model) -> dict[str, np.ndarray]:
        """`model`'s outputs on the held-out inputs, computed once per run step (`model` must be
        the model that entered the current pass, or its snapshot)."""
        if self.reference is None:
            self.reference = runtime.run_all(model, self.holdout.inputs)
        return self.reference

    def capture(
        self, model: ir.Model, names: Sequence[str], split: str = "fit"
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of the named intermediate values of `model` over a calibration split."""
        data = self.fit if split == "fit" else self.holdout
        if data is None:
            raise ValueError("no calibration data: pass --calib")
        return runtime.capture(
            model, names, data.inputs, self.batch_size, label=f"calibration ({split})"
        )
