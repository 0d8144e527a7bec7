"""Low-rank factorization of conv kernels along input channels (pure numpy, no IR).

A group-1 conv weight `W [O, C, *k]` unfolded along C is `M [C, O·K]` (K = prod(k)); a rank-r
factorization `M ≈ Pᵀ B` is a 1x1 conv `P [r, C]` followed by the original kxk conv with
`W2 = fold(B) [O, r, *k]`. Three ways to pick the factors, each better given more information:
`svd` (weights only), `whitened` (weights and the input's second moment) and `refit` (least
squares against the original layer's outputs on calibration activations, Zhang et al. 2015).
All math runs in float64; callers cast the results to the model's dtype.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Shrinkage of the input second moment toward its diagonal: small, off-domain calibration
#: sets made plain whitening worse than SVD on a real detector.
DEFAULT_SHRINK = 0.2
DEFAULT_EPS = 1e-6  # relative to the mean diagonal of the second moment
DEFAULT_RIDGE = 1e-5  # relative to the mean diagonal of the normal equations


# ------------------------------------------------------------------------------ unfolding


def unfold_input(weight: np.ndarray) -> np.ndarray:
    """`W [O, C, *k]` -> `M [C, O·K]`: one row per input channel."""
    o, c = weight.shape[:2]
    return np.asarray(weight, np.float64).reshape(o, c, -1).transpose(1, 0, 2).reshape(c, -1)


def fold_kernel(b: np.ndarray, out_channels: int, kernel: Sequence[int]) -> np.ndarray:
    """`B [r, O·K]` -> the kxk weight `W2 [O, r, *k]` (inverse of `unfold_input`)."""
    r = b.shape[0]
    return b.reshape(r, out_channels, -1).transpose(1, 0, 2).reshape(out_channels, r, *kernel)


@dataclass(frozen=True)
class Factors:
    """A rank-r input factorization: 1x1 `reduce [r, C]`, kxk `kernel [O, r, *k]`, `bias [O]`."""

    reduce: np.ndarray
    kernel: np.ndarray
    bias: np.ndarray | None

    @property
    def rank(self) -> int:
        return int(self.reduce.shape[0])


def _balance(p: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm rows of P with their scale moved into B (keeps float16 weights in range)."""
    norms = np.linalg.norm(p, axis=1)
    norms[norms == 0] = 1.0
    return p / norms[:, None], b * norms[:, None]


def balance(p: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Public form of `_balance`, for factorizations built outside this module."""
    return _balance(p, b)


# ------------------------------------------------------------------------------ second moments


class SecondMoment:
    """Running `Σ = E[x xᵀ]` over channels of activations `[N, C, *spatial]` (bounded memory)."""

    def __init__(self, channels: int) -> None:
        self.sum = np.zeros((channels, channels))
        self.count = 0

    def add(self, activations: np.ndarray) -> None:
        x = np.asarray(activations, np.float64)
        flat = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
        self.sum += flat.T @ flat
        self.count += flat.shape[0]

    def value(self) -> np.ndarray:
        return self.sum / max(self.count, 1)


def shrink_covariance(
    sigma: np.ndarray, alpha: float = DEFAULT_SHRINK, eps: float = DEFAULT_EPS
) -> np.ndarray:
    """`(1-α) Σ + α diag(Σ) + ε·mean(diag)·I`: a well-conditioned, less overfitted Σ."""
    diag = np.diag(np.diag(sigma))
    shrunk = (1.0 - alpha) * sigma + alpha * diag
    scale = float(np.mean(np.diag(sigma))) if sigma.size else 1.0
    return shrunk + eps * max(scale, 1e-12) * np.eye(sigma.shape[0])


def _sqrt_factor(sigma: np.ndarray) -> np.ndarray:
    """L with Σ = L Lᵀ (Cholesky; eigen square root when Cholesky fails on a near-singular Σ)."""
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:
        vals, vecs = np.linalg.eigh(sigma)
        return vecs * np.sqrt(np.clip(vals, 1e-12 * max(vals.max(), 1e-30), None))


# ------------------------------------------------------------------------------ spectra and inits


@dataclass(frozen=True)
class Spectrum:
    """Singular values of the (possibly whitened) unfolded kernel, with vectors to rebuild it."""

    u: np.ndarray  # [C, C'] left vectors in the (whitened) input space
    s: np.ndarray  # [C'] descending
    vt: np.ndarray  # [C', O·K]
    unwhiten: np.ndarray | None = None  # L^{-T}: maps whitened left vectors back to channel space

    def energy(self) -> np.ndarray:
        """Cumulative share of the squared spectrum kept at rank 1..len(s)."""
        sq = self.s**2
        total = float(sq.sum())
        return np.cumsum(sq) / total if total > 0 else np.ones_like(sq)

    def relative_error(self, rank: int) -> float:
        """Estimated relative output error at `rank`: sqrt(tail energy / total energy)."""
        sq = self.s**2
        total = float(sq.sum())
        return math.sqrt(float(sq[rank:].sum()) / total) if total > 0 else 0.0

    def factors(self, rank: int, out_channels: int, kernel: Sequence[int],
                bias: np.ndarray | None) -> Factors:
        """The best rank-r factors under this spectrum's metric."""
        u_r = self.u[:, :rank]
        p_t = u_r if self.unwhiten is None else self.unwhiten @ u_r  # [C, r]
        b = self.s[:rank, None] * self.vt[:rank]  # [r, O·K]
        p, b = _balance(p_t.T, b)
        return Factors(p, fold_kernel(b, out_channels, kernel),
                       None if bias is None else np.asarray(bias, np.float64))


def thin_svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`a = U S Vᵀ` for a wide `[C, O·K]` matrix via the eigenvectors of the small `a aᵀ`
    (several times faster than LAPACK's SVD on such shapes; the leading vectors, the only ones
    a truncation keeps, are accurate)."""
    if a.shape[1] < 2 * a.shape[0]:
        return np.linalg.svd(a, full_matrices=False)
    vals, u = np.linalg.eigh(a @ a.T)
    order = np.argsort(vals)[::-1]
    vals, u = np.clip(vals[order], 0.0, None), u[:, order]
    s = np.sqrt(vals)
    projected = u.T @ a
    tiny = s <= 1e-12 * max(float(s[0]) if s.size else 0.0, 1e-300)
    vt = np.where(tiny[:, None], 0.0, projected / np.where(tiny, 1.0, s)[:, None])
    return u, s, vt


def svd_spectrum(weight: np.ndarray) -> Spectrum:
    """Data-free: SVD of the unfolded kernel (minimises the weight error)."""
    return Spectrum(*thin_svd(unfold_input(weight)))


def whitened_spectrum(
    weight: np.ndarray, sigma: np.ndarray, alpha: float = DEFAULT_SHRINK, eps: float = DEFAULT_EPS
) -> Spectrum:
    """Data-aware: SVD of `Lᵀ M` with `Σ = L Lᵀ` (minimises E‖(M - M̂)ᵀ x‖², the output error)."""
    m = unfold_input(weight)
    lower = _sqrt_factor(shrink_covariance(np.asarray(sigma, np.float64), alpha, eps))
    u, s, vt = thin_svd(lower.T @ m)
    unwhiten = np.linalg.inv(lower.T)  # L^{-T}
    return Spectrum(u, s, vt, unwhiten)


def svd_init(weight: np.ndarray, rank: int, bias: np.ndarray | None = None) -> Factors:
    return svd_spectrum(weight).factors(rank, weight.shape[0], weight.shape[2:], bias)


def whitened_init(weight: np.ndarray, sigma: np.ndarray, rank: int,
                  bias: np.ndarray | None = None, alpha: float = DEFAULT_SHRINK,
                  eps: float = DEFAULT_EPS) -> Factors:
    spectrum = whitened_spectrum(weight, sigma, alpha, eps)
    return spectrum.factors(rank, weight.shape[0], weight.shape[2:], bias)


def reconstruct(factors: Factors) -> np.ndarray:
    """The full kernel `W2 ∘ P` the factors implement ([O, C, *k])."""
    w2 = factors.kernel
    o, r = w2.shape[:2]
    return np.einsum("ork,rc->ock", w2.reshape(o, r, -1), factors.reduce).reshape(
        o, factors.reduce.shape[1], *w2.shape[2:]
    )


# ------------------------------------------------------------------------------ rank selection


def rank_for_ratio(ratio: float, channels: int) -> float:
    return ratio * channels


def rank_for_energy(spectrum: Spectrum, energy: float) -> int:
    """Smallest rank keeping `energy` of the (whitened) squared spectrum."""
    kept = spectrum.energy()
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(kept)))


def round_up(rank: float, multiple: int, limit: int) -> int:
    """Round up to a multiple of `multiple` (energy must be kept at least), capped at `limit`."""
    multiple = max(1, multiple)
    return int(min(max(multiple, math.ceil(rank / multiple) * multiple), limit))


def candidate_ranks(channels: int, multiple: int) -> list[int]:
    """Allowed ranks below full: multiples of `multiple` (or every rank when it is 1)."""
    step = max(1, multiple)
    return list(range(step, channels, step))


@dataclass
class LayerChoices:
    """A layer's options for global allocation: per rank, MACs (or ms) saved and estimated
    error²."""

    key: object
    ranks: list[int]
    macs_saved: list[int]
    error_sq: list[float]
    weight: float = 1.0  # sensitivity of the model output to this layer's error


@dataclass
class Allocation:
    ranks: dict = field(default_factory=dict)  # key -> rank (absent: left alone)
    macs_saved: float = 0
    reached: bool = False


def allocate_ranks(layers: Sequence[LayerChoices], macs_to_save: float) -> Allocation:
    """Greedy global allocation: repeatedly take the step with the least added (weighted)
    error per MAC saved until `macs_to_save` is reached. The gains may be any additive cost
    (objective=latency passes measured milliseconds in `macs_saved`).

    From a layer's current choice every cheaper rank is a possible step (the lower convex hull
    of its error-vs-saving curve), so a rank with little saving does not block a better one below.
    """
    state: dict[int, int] = {}  # layer index -> index into its ranks (absent: not rewritten)
    saved = 0

    def best_step(i: int) -> tuple[float, int] | None:
        layer = layers[i]
        cur = state.get(i)
        cur_saved = layer.macs_saved[cur] if cur is not None else 0
        cur_err = layer.weight * layer.error_sq[cur] if cur is not None else 0.0
        best = None
        for j, (gain, err) in enumerate(zip(layer.macs_saved, layer.error_sq, strict=True)):
            if gain <= cur_saved:
                continue
            cost = (layer.weight * err - cur_err) / (gain - cur_saved)
            if best is None or cost < best[0]:
                best = (cost, j)
        return best

    heap: list[tuple[float, int, int]] = []
    for i in range(len(layers)):
        step = best_step(i)
        if step is not None:
            heapq.heappush(heap, (step[0], i, step[1]))
    while saved < macs_to_save and heap:
        _, i, j = heapq.heappop(heap)
        cur = state.get(i)
        expected = best_step(i)
        if expected is None or expected[1] != j:  # stale entry
            if expected is not None:
                heapq.heappush(heap, (expected[0], i, expected[1]))
            continue
        saved += layers[i].macs_saved[j] - (layers[i].macs_saved[cur] if cur is not None else 0)
        state[i] = j
        step = best_step(i)
        if step is not None:
            heapq.heappush(heap, (step[0], i, step[1]))
    return Allocation(
        ranks={layers[i].key: layers[i].ranks[j] for i, j in state.items()},
        macs_saved=saved,
        reached=saved >= macs_to_save,
    )


# ------------------------------------------------------------------------------ im2col


@dataclass(frozen=True)
class Window:
    """Conv sliding-window geometry: kernel, strides, dilations, padding rule."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end... (used when auto_pad is NOTSET)
    auto_pad: str = "NOTSET"

    def pad_begin(self, in_dims: Sequence[int], out_dims: Sequence[int]) -> list[int]:
        """Leading zero padding per spatial axis, following ONNX auto_pad rules."""
        if self.auto_pad in ("", "NOTSET"):
            return list(self.pads[: len(self.kernel)])
        if self.auto_pad == "VALID":
            return [0] * len(self.kernel)
        begin = []
        axes = zip(in_dims, out_dims, self.kernel, self.strides, self.dilations, strict=True)
        for size, out, k, s, d in axes:
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            begin.append(total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2)
        return begin


def sample_positions(
    batch: int, out_dims: Sequence[int], limit: int | None, rng: np.random.Generator
) -> np.ndarray:
    """`[P, 1+D]` (sample, output coords) rows: all positions, or `limit` drawn without
    replacement on large maps."""
    total = batch * math.prod(out_dims)
    flat = np.arange(total) if limit is None or total <= limit else np.sort(
        rng.choice(total, size=limit, replace=False)
    )
    return np.stack(np.unravel_index(flat, (batch, *out_dims)), axis=1)


def gather_patches(x: np.ndarray, window: Window, out_dims: Sequence[int],
                   positions: np.ndarray) -> np.ndarray:
    """im2col at chosen output positions: `[P, C·K]` (channel-major, kernel offsets minor)."""
    spatial = x.shape[2:]
    begin = window.pad_begin(spatial, out_dims)
    end = [
        max(0, (o - 1) * s + (k - 1) * d + 1 - n - b)
        for o, s, k, d, n, b in zip(out_dims, window.strides, window.kernel, window.dilations,
                                    spatial, begin, strict=True)
    ]
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begin, end, strict=True)])
    samples = positions[:, 0]
    base = [positions[:, 1 + a] * window.strides[a] for a in range(len(out_dims))]
    columns = []
    for offset in itertools.product(*(range(k) for k in window.kernel)):
        coords = tuple(base[a] + offset[a] * window.dilations[a] for a in range(len(offset)))
        columns.append(padded[(samples, slice(None), *coords)])  # [P, C]
    return np.stack(columns, axis=2).reshape(len(positions), -1)


def gather_outputs(y: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Output rows `[P, O]` at the positions chosen by `sample_positions`."""
    coords = tuple(positions[:, 1 + a] for a in range(y.ndim - 2))
    return y[(positions[:, 0], slice(None), *coords)]


# ------------------------------------------------------------------------------ refit


class NormalEquations:
    """`A = ZᵀZ`, `B = ZᵀY` of the ridge least squares `min ‖Z θ − Y‖² + λ‖θ‖²`, accumulated
    over batches so activations never need to be held all at once. Z gets a ones column (bias).
    """

    def __init__(self, features: int, outputs: int) -> None:
        self.a = np.zeros((features + 1, features + 1))
        self.b = np.zeros((features + 1, outputs))
        self.rows = 0

    def add(self, z: np.ndarray, y: np.ndarray) -> None:
        z1 = np.concatenate([np.asarray(z, np.float64), np.ones((len(z), 1))], axis=1)
        self.a += z1.T @ z1
        self.b += z1.T @ np.asarray(y, np.float64)
        self.rows += len(z)

    def solve(self, ridge: float = DEFAULT_RIDGE) -> tuple[np.ndarray, np.ndarray]:
        """(weights [outputs, features], bias [outputs]); λ is relative to the mean diagonal."""
        n = self.a.shape[0] - 1
        scale = float(np.mean(np.diag(self.a)[:n])) if n else 1.0
        reg = np.zeros(n + 1)
        reg[:n] = ridge * max(scale, 1e-12)
        system = self.a + np.diag(reg)
        try:
            theta = np.linalg.solve(system, self.b)
        except np.linalg.LinAlgError:  # singular without ridge (e.g. a dead channel)
            theta = np.linalg.lstsq(system, self.b, rcond=None)[0]
        return theta[:n].T, theta[n]

    def input_moment(self) -> np.ndarray:
        """E[z zᵀ] of the features (no bias column): the data metric for the output factor."""
        n = self.a.shape[0] - 1
        return self.a[:n, :n] / max(self.rows, 1)


@dataclass
class SampledTargets:
    """An original layer's outputs kept only at sampled output positions, per calibration
    batch: one capture run of the original model serves many layers in bounded memory."""

    out_dims: tuple[int, ...] = ()
    batches: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def add(self, y: np.ndarray, limit: int | None, rng: np.random.Generator) -> None:
        self.out_dims = tuple(y.shape[2:])
        positions = sample_positions(len(y), self.out_dims, limit, rng)
        self.batches.append((positions, gather_outputs(y, positions).astype(np.float32)))

    @staticmethod
    def nbytes_estimate(batches: int, batch: int, out_shape: Sequence[int],
                        limit: int | None) -> int:
        """Memory the rows of one layer will take (`out_shape` per sample, channels first)."""
        positions = batch * math.prod(out_shape[1:])
        rows = positions if limit is None else min(positions, limit)
        return batches * rows * int(out_shape[0]) * 4


class RefitAccumulator:
    """Refit of the kxk conv given a fixed 1x1 `P`: feed batches of the rewritten model's conv
    input x̂ and the original conv output y; `solve` gives `W2` and bias."""

    def __init__(self, reduce: np.ndarray, out_channels: int, window: Window,
                 max_positions: int | None = None, seed: int = 0) -> None:
        self.reduce = np.asarray(reduce, np.float64)
        self.window = window
        self.out_channels = out_channels
        self.max_positions = max_positions
        self.rng = np.random.default_rng(seed)
        k = math.prod(window.kernel)
        self.equations = NormalEquations(self.reduce.shape[0] * k, out_channels)

    def add(self, x_hat: np.ndarray, y: np.ndarray) -> None:
        out_dims = y.shape[2:]
        positions = sample_positions(len(y), out_dims, self.max_positions, self.rng)
        self.add_rows(x_hat, out_dims, positions, gather_outputs(y, positions))

    def add_rows(self, x_hat: np.ndarray, out_dims: Sequence[int], positions: np.ndarray,
                 y_rows: np.ndarray) -> None:
        """A batch whose targets were already gathered at `positions` (see `SampledTargets`)."""
        z = np.einsum("rc,nc...->nr...", self.reduce, np.asarray(x_hat, np.float64))
        self.equations.add(gather_patches(z, self.window, out_dims, positions),
                           np.asarray(y_rows, np.float64))

    def solve(self, ridge: float = DEFAULT_RIDGE) -> Factors:
        w, b = self.equations.solve(ridge)
        r = self.reduce.shape[0]
        kernel = w.reshape(self.out_channels, r, *self.window.kernel)
        return Factors(self.reduce, kernel, b)


class ReduceRefitAccumulator:
    """Refit of the 1x1 `P` with the kxk `W2` (and bias) fixed: one alternation step.

    y − b = Σ_k W2_k P x_k is linear in P. Its normal equations factor through the patch
    moments `XᵀX [C·K, C·K]` and `Xᵀ(Y − b) [C·K, O]`, accumulated over batches; the
    `(r·C)²` system is assembled once in `solve`, so only layers with small r·C get this step.
    """

    def __init__(self, kernel: np.ndarray, bias: np.ndarray | None, window: Window,
                 channels: int) -> None:
        self.kernel = np.asarray(kernel, np.float64)
        o, r = self.kernel.shape[:2]
        self.bias = np.zeros(o) if bias is None else np.asarray(bias, np.float64)
        self.window = window
        self.channels = channels
        k = math.prod(window.kernel)
        self.xx = np.zeros((channels * k, channels * k))
        self.xy = np.zeros((channels * k, o))

    def add_rows(self, x_hat: np.ndarray, out_dims: Sequence[int], positions: np.ndarray,
                 y_rows: np.ndarray) -> None:
        patches = gather_patches(np.asarray(x_hat, np.float64), self.window, out_dims, positions)
        self.xx += patches.T @ patches
        self.xy += patches.T @ (np.asarray(y_rows, np.float64) - self.bias)

    def solve(self, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
        o, r = self.kernel.shape[:2]
        c = self.channels
        w2 = self.kernel.reshape(o, r, -1)  # [O, r, K]
        k = w2.shape[2]
        h = np.einsum("oak,obl->akbl", w2, w2)  # [r, K, r, K]
        xx = self.xx.reshape(c, k, c, k)
        a = np.einsum("akbl,ckdl->acbd", h, xx).reshape(r * c, r * c)
        b = np.einsum("oak,cko->ac", w2, self.xy.reshape(c, k, o)).reshape(r * c)
        scale = float(np.mean(np.diag(a))) if a.size else 1.0
        a[np.diag_indices_from(a)] += ridge * max(scale, 1e-12)
        try:
            p = np.linalg.solve(a, b)
        except np.linalg.LinAlgError:
            p = np.linalg.lstsq(a, b, rcond=None)[0]
        return p.reshape(r, c)


# ------------------------------------------------------------------------------ Tucker-2


@dataclass(frozen=True)
class Tucker2:
    """1x1 reduce `[r_in, C]`, kxk core `[r_out, r_in, *k]`, 1x1 restore `[O, r_out]` + bias."""

    reduce: np.ndarray
    core: np.ndarray
    restore: np.ndarray
    bias: np.ndarray | None


def restore_outputs(factors: Factors, rank_out: int,
                    feature_moment: np.ndarray | None = None) -> Tucker2:
    """Split the kxk conv of `factors` into a core to `rank_out` channels and a 1x1 restore.

    With the moment E[z zᵀ] of the kxk conv's patches, the restore spans the top principal
    directions of the predicted outputs (least output error); without, of the kernel itself.
    """
    w2 = factors.kernel
    o = w2.shape[0]
    flat = w2.reshape(o, -1)
    if feature_moment is not None:
        cov = flat @ feature_moment @ flat.T
        vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
        q = vecs[:, np.argsort(vals)[::-1][:rank_out]]
    else:
        q = np.linalg.svd(flat, full_matrices=False)[0][:, :rank_out]
    core = (q.T @ flat).reshape(rank_out, *w2.shape[1:])
    return Tucker2(factors.reduce, core, q, factors.bias)


def tucker2_reconstruct(t: Tucker2) -> np.ndarray:
    return reconstruct(Factors(t.reduce, np.einsum("oa,a...->o...", t.restore, t.core), t.bias))


def relative_error(reference: np.ndarray, approx: np.ndarray) -> float:
    ref = np.linalg.norm(reference)
    return float(np.linalg.norm(approx - reference) / ref) if ref > 0 else 0.0


def moments_from_batches(batches: Sequence[np.ndarray] | Mapping) -> np.ndarray:
    """Σ of a few in-memory activation batches (convenience for tests and small models)."""
    items = list(batches.values()) if isinstance(batches, Mapping) else list(batches)
    acc = SecondMoment(items[0].shape[1])
    for b in items:
        acc.add(b)
    return acc.value()
