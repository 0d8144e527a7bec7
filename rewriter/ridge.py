"""Closed-form ridge regression with an unpenalised bias, and its strength chosen on held-out data.

Used to fit a replacement layer to the outputs of the layer it replaces (Y ≈ X Wᵀ + b). The
penalty pulls W towards a prior (zero, or a starting weight such as a spatially collapsed layer,
so a strong penalty returns the start point rather than nothing) and is scaled by the mean
feature variance, so one grid of strengths fits any data scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Strengths relative to the mean eigenvalue of the centred Gram matrix.
DEFAULT_GRID: tuple[float, ...] = tuple(float(x) for x in np.logspace(-6, 3, 19))


@dataclass(frozen=True)
class RidgeFit:
    """Y ≈ X @ weight.T + bias; `lam` is the absolute penalty used."""

    weight: np.ndarray  # [out, in]
    bias: np.ndarray  # [out]
    lam: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.weight.T + self.bias


def _centred(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):  # LAPACK would fail or return NaN
        from rewriter.errors import CalibrationError

        raise CalibrationError("ridge fit: NaN/inf in the activations it fits "
                               "(non-finite activations on the calibration data)")
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    return x - x_mean, y - y_mean, x_mean, y_mean


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float, prior: np.ndarray | None = None
              ) -> RidgeFit:
    """Minimise ||X Wᵀ + b - Y||² + lam ||W - prior||² (bias not penalised), in float64."""
    xc, yc, x_mean, y_mean = _centred(x, y)
    return _solve(xc, yc, x_mean, y_mean, lam, prior)


def _solve(xc: np.ndarray, yc: np.ndarray, x_mean: np.ndarray, y_mean: np.ndarray, lam: float,
           prior: np.ndarray | None = None) -> RidgeFit:
    if prior is not None:  # ridge on the residual of the prior, then add the prior back
        prior = np.asarray(prior, np.float64).reshape(yc.shape[1], xc.shape[1])
        fit = _solve(xc, yc - xc @ prior.T, x_mean, y_mean - x_mean @ prior.T, lam)
        return RidgeFit(fit.weight + prior, y_mean - (fit.weight + prior) @ x_mean, fit.lam)
    n, d = xc.shape
    if d <= n:
        gram = xc.T @ xc
        gram[np.diag_indices_from(gram)] += lam
        weight = np.linalg.solve(gram, xc.T @ yc).T if lam > 0 else np.linalg.lstsq(
            xc, yc, rcond=None)[0].T
    else:  # fewer samples than features: solve in sample space (dual form)
        kernel = xc @ xc.T
        kernel[np.diag_indices_from(kernel)] += max(lam, 1e-12 * np.trace(kernel) / n)
        weight = (xc.T @ np.linalg.solve(kernel, yc)).T
    bias = y_mean - weight @ x_mean
    return RidgeFit(weight, bias, float(lam))


def scale_of(x: np.ndarray) -> float:
    """Mean eigenvalue of the centred Gram matrix (sum of feature variances × n / d)."""
    xc = np.asarray(x, np.float64).reshape(len(x), -1)
    xc = xc - xc.mean(axis=0)
    return float(np.sum(xc * xc) / max(xc.shape[1], 1)) or 1.0


def choose_lambda(
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    x_held: np.ndarray,
    y_held: np.ndarray,
    grid: Sequence[float] = DEFAULT_GRID,
    prior: np.ndarray | None = None,
) -> tuple[RidgeFit, list[tuple[float, float]]]:
    """Fit on one split for each relative strength; keep the one with least held-out error.

    Returns the best fit (trained on `x_fit` only) and (lam, held-out MSE) for every strength.
    """
    xc, yc, x_mean, y_mean = _centred(x_fit, y_fit)
    scale = scale_of(x_fit)
    x_held = np.asarray(x_held, np.float64).reshape(len(x_held), -1)
    y_held = np.asarray(y_held, np.float64).reshape(len(y_held), -1)
    best: RidgeFit | None = None
    best_err = np.inf
    curve = []
    for rel in grid:
        fit = _solve(xc, yc, x_mean, y_mean, rel * scale, prior)
        err = float(np.mean((fit.predict(x_held) - y_held) ** 2))
        curve.append((fit.lam, err))
        if err < best_err:
            best, best_err = fit, err
    if best is None:  # every held-out error was NaN/inf: nothing to choose from
        from rewriter.errors import CalibrationError

        raise CalibrationError("ridge fit: held-out error is NaN/inf for every strength "
                               "(non-finite activations on the calibration data)")
    return best, curve
