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
#: Eigenvalues of the input second moment below this share of the largest are its null space.
DEFAULT_NULL_TOL = 1e-9
DEFAULT_ALS_ITERS = 8  # Tucker-2 ALS sweeps; a few are enough on conv kernels
BIAS_CORRECTION = True  # data-aware factors get the bias that removes the mean output shift
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
        self.first = np.zeros(channels)
        self.count = 0

    def add(self, activations: np.ndarray) -> None:
        x = np.asarray(activations, np.float64)
        flat = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
        self.sum += flat.T @ flat
        self.first += flat.sum(axis=0)
        self.count += flat.shape[0]

    def value(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    def mean(self) -> np.ndarray:
        """E[x] per channel (for bias correction of data-free or whitened factors)."""
        return self.first / max(self.count, 1)


def shrink_covariance(
    sigma: np.ndarray, alpha: float = DEFAULT_SHRINK, eps: float = DEFAULT_EPS
) -> np.ndarray:
    """`(1-α) Σ + α diag(Σ) + ε·mean(diag)·I`: a well-conditioned, less overfitted Σ."""
    diag = np.diag(np.diag(sigma))
    shrunk = (1.0 - alpha) * sigma + alpha * diag
    scale = float(np.mean(np.diag(sigma))) if sigma.size else 1.0
    return shrunk + eps * max(scale, 1e-12) * np.eye(sigma.shape[0])


@dataclass(frozen=True)
class Whitening:
    """`Σ = V Λ Vᵀ` restricted to its range: `root = Λ_k^{1/2} V_kᵀ [k, C]` and
    `pinv_root = V_k Λ_k^{-1/2} [C, k]` (BALF-style: directions the data never takes are
    dropped, not regularised into huge gains, so factors built from it stay well-conditioned)."""

    root: np.ndarray
    pinv_root: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.root.shape[0])


def whitening(sigma: np.ndarray, tol: float = DEFAULT_NULL_TOL) -> Whitening:
    """Eigen square root of a second moment, dropping eigenvalues below `tol`·λ_max."""
    sym = (np.asarray(sigma, np.float64) + np.asarray(sigma, np.float64).T) / 2
    vals, vecs = np.linalg.eigh(sym)
    top = float(vals[-1]) if vals.size else 0.0
    keep = vals > tol * top if top > 0 else np.zeros(vals.shape, bool)
    if not keep.any():  # an all-zero input: one harmless direction so shapes stay valid
        keep[-1:] = True
        vals = np.where(keep, 1.0, vals)
    vals, vecs = vals[keep][::-1], vecs[:, keep][:, ::-1]
    root_vals = np.sqrt(vals)
    return Whitening((vecs * root_vals).T, vecs / root_vals)


# ------------------------------------------------------------------------------ spectra and inits


@dataclass(frozen=True)
class Spectrum:
    """Singular values of the (possibly whitened) unfolded kernel, with vectors to rebuild it."""

    u: np.ndarray  # [C, C'] left vectors in the (whitened) input space
    s: np.ndarray  # [C'] descending
    vt: np.ndarray  # [C', O·K]
    unwhiten: np.ndarray | None = None  # maps whitened left vectors back to channel space
    moment: np.ndarray | None = None  # the (shrunk) input second moment it was whitened by
    mean: np.ndarray | None = None  # the input channel mean (bias correction)

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

    def in_out_error(self, rank: int, rank_out: int, out_channels: int) -> float:
        """Estimated relative output error of Tucker-2 at (rank, rank_out): this spectrum's
        rank-r input factor, then the best output factor for it (the ALS init; ALS sweeps
        only lower it). Cheap: no new whitening, one `[O, O]` eigenproblem."""
        sq = self.s**2
        total = float(sq.sum())
        if total <= 0:
            return 0.0
        b = (self.s[:rank, None] * self.vt[:rank]).reshape(min(rank, len(self.s)),
                                                            out_channels, -1)
        vals = np.linalg.eigvalsh(np.einsum("bok,bpk->op", b, b))
        kept = float(np.sum(np.sort(vals)[::-1][:rank_out]))
        return math.sqrt(max(total - kept, 0.0) / total)

    def factors(self, rank: int, out_channels: int, kernel: Sequence[int],
                bias: np.ndarray | None) -> Factors:
        """The best rank-r factors under this spectrum's metric."""
        u_r = self.u[:, :rank]
        p_t = u_r if self.unwhiten is None else self.unwhiten @ u_r  # [C, r']
        b = self.s[:rank, None] * self.vt[:rank]  # [r', O·K]
        if p_t.shape[1] < rank:  # more rank than the data has directions: exact already
            p_t = np.pad(p_t, [(0, 0), (0, rank - p_t.shape[1])])
            b = np.pad(b, [(0, rank - b.shape[0]), (0, 0)])
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
    weight: np.ndarray, sigma: np.ndarray, alpha: float = DEFAULT_SHRINK, eps: float = 0.0,
    tol: float = DEFAULT_NULL_TOL,
) -> Spectrum:
    """Data-aware: SVD of `Σ^{1/2} M` on the range of Σ (minimises E‖(M - M̂)ᵀ x‖², the output
    error, also when Σ is rank-deficient: dead channels, fewer samples than channels)."""
    m = unfold_input(weight)
    moment = shrink_covariance(np.asarray(sigma, np.float64), alpha, eps)
    white = whitening(moment, tol)
    u, s, vt = thin_svd(white.root @ m)
    return Spectrum(u, s, vt, white.pinv_root, moment)


def svd_init(weight: np.ndarray, rank: int, bias: np.ndarray | None = None) -> Factors:
    return svd_spectrum(weight).factors(rank, weight.shape[0], weight.shape[2:], bias)


def whitened_init(weight: np.ndarray, sigma: np.ndarray, rank: int,
                  bias: np.ndarray | None = None, alpha: float = DEFAULT_SHRINK,
                  eps: float = 0.0) -> Factors:
    spectrum = whitened_spectrum(weight, sigma, alpha, eps)
    return spectrum.factors(rank, weight.shape[0], weight.shape[2:], bias)


def reconstruct(factors: Factors) -> np.ndarray:
    """The full kernel `W2 ∘ P` the factors implement ([O, C, *k])."""
    w2 = factors.kernel
    o, r = w2.shape[:2]
    return np.einsum("ork,rc->ock", w2.reshape(o, r, -1), factors.reduce).reshape(
        o, factors.reduce.shape[1], *w2.shape[2:]
    )


# ------------------------------------------------------------------------------ corrections


def corrected_bias(weight: np.ndarray, approx: np.ndarray, bias: np.ndarray | None,
                   mean_input: np.ndarray) -> np.ndarray:
    """Bias that removes the mean output shift of an approximate kernel (Nagel et al. 2019):
    `b + Σ_{c,k} (W − Ŵ)[o, c, k] E[x[c, k]]`. `mean_input` is the channel mean `[C]` (the
    same at every kernel offset: exact away from zero-padded borders) or the patch mean
    `[C, *k]`."""
    diff = (np.asarray(weight, np.float64) - approx).reshape(weight.shape[0], weight.shape[1], -1)
    mu = np.asarray(mean_input, np.float64).reshape(weight.shape[1], -1)
    shift = np.einsum("ock,ck->o", diff, np.broadcast_to(mu, diff.shape[1:]))
    base = np.zeros(weight.shape[0]) if bias is None else np.asarray(bias, np.float64)
    return base + shift


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-np.clip(x, -60, 60)))


def silu_grad(x: np.ndarray) -> np.ndarray:
    sig = 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))
    return sig * (1.0 + x * (1.0 - sig))


ACTIVATIONS = {
    "Silu": (silu, silu_grad),
    "Relu": (lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(np.float64)),
    "Identity": (lambda x: x, np.ones_like),
}


def activation_affine(pred: np.ndarray, target: np.ndarray, activation: str = "Silu",
                      iters: int = 8, damping: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel `(scale, shift)` minimising `Σ (act(s·ŷ + t) − act(y))²` over rows
    `[n, O]` of the rewritten (`pred`) and original (`target`) pre-activations: a few damped
    Gauss-Newton steps through the activation, each kept only where it lowers the channel's
    post-activation error (so the result is never worse than `(1, 0)`). Fold into the layer as
    `W2 ← s·W2`, `b ← s·b + t`."""
    act, grad = ACTIVATIONS[activation]
    yhat = np.asarray(pred, np.float64)
    goal = act(np.asarray(target, np.float64))
    o = yhat.shape[1]
    scale, shift = np.ones(o), np.zeros(o)

    def loss(s: np.ndarray, t: np.ndarray) -> np.ndarray:
        return np.sum((act(yhat * s + t) - goal) ** 2, axis=0)

    current = loss(scale, shift)
    for _ in range(iters):
        z = yhat * scale + shift
        r = act(z) - goal
        g = grad(z)
        ja, jb = g * yhat, g  # d act / d scale, d act / d shift
        a11, a12, a22 = np.sum(ja * ja, 0), np.sum(ja * jb, 0), np.sum(jb * jb, 0)
        b1, b2 = np.sum(ja * r, 0), np.sum(jb * r, 0)
        lam = damping * (a11 + a22) + 1e-300
        a11, a22 = a11 + lam, a22 + lam
        det = a11 * a22 - a12 * a12
        det = np.where(np.abs(det) > 1e-300, det, np.inf)
        da, db = (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
        trial_s, trial_t = scale - da, shift - db
        trial = loss(trial_s, trial_t)
        better = trial < current
        scale, shift = np.where(better, trial_s, scale), np.where(better, trial_t, shift)
        current = np.where(better, trial, current)
        if not better.any():
            break
    return scale, shift


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
    sizes: list[int] = field(default_factory=list)  # samples per batch

    def add(self, y: np.ndarray, limit: int | None, rng: np.random.Generator) -> None:
        self.out_dims = tuple(y.shape[2:])
        self.sizes.append(len(y))
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
                 max_positions: int | None = None, seed: int = 0, keep_rows: int = 0) -> None:
        self.reduce = np.asarray(reduce, np.float64)
        self.window = window
        self.out_channels = out_channels
        self.max_positions = max_positions
        self.rng = np.random.default_rng(seed)
        k = math.prod(window.kernel)
        self.equations = NormalEquations(self.reduce.shape[0] * k, out_channels)
        self.keep_rows = keep_rows  # rows kept for a post-activation correction
        self._kept: list[tuple[np.ndarray, np.ndarray]] = []
        self._kept_count = 0

    def add(self, x_hat: np.ndarray, y: np.ndarray) -> None:
        out_dims = y.shape[2:]
        positions = sample_positions(len(y), out_dims, self.max_positions, self.rng)
        self.add_rows(x_hat, out_dims, positions, gather_outputs(y, positions))

    def add_rows(self, x_hat: np.ndarray, out_dims: Sequence[int], positions: np.ndarray,
                 y_rows: np.ndarray) -> None:
        """A batch whose targets were already gathered at `positions` (see `SampledTargets`)."""
        x = np.asarray(x_hat, np.float64)
        if math.prod(self.window.kernel) == 1:  # a 1x1 window: reduce only the sampled rows
            patches = gather_patches(x, self.window, out_dims, positions) @ self.reduce.T
        else:
            z = np.einsum("rc,nc...->nr...", self.reduce, x)
            patches = gather_patches(z, self.window, out_dims, positions)
        y = np.asarray(y_rows, np.float64)
        self.equations.add(patches, y)
        take = min(self.keep_rows - self._kept_count, len(patches))
        if take > 0:  # positions are already a random sample: keep the first ones
            self._kept.append((patches[:take].copy(), y[:take].copy()))
            self._kept_count += take

    def kept_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Patches `[n, r·K]` of the reduced input and original outputs `[n, O]` kept so far."""
        if not self._kept:
            width = self.equations.a.shape[0] - 1
            return np.zeros((0, width)), np.zeros((0, self.out_channels))
        return (np.concatenate([z for z, _ in self._kept]),
                np.concatenate([y for _, y in self._kept]))

    def solve(self, ridge: float = DEFAULT_RIDGE) -> Factors:
        w, b = self.equations.solve(ridge)
        r = self.reduce.shape[0]
        kernel = w.reshape(self.out_channels, r, *self.window.kernel)
        return Factors(self.reduce, kernel, b)


def reduced_rank_fit(equations: NormalEquations, rank: int, kernel: Sequence[int],
                     ridge: float = DEFAULT_RIDGE) -> Factors:
    """The best rank-`rank` linear map from inputs to targets in least squares (reduced-rank
    regression): the ridge solution `M`, projected onto the top principal directions `V` of
    its centred fitted values. For a 1x1 conv (`kernel` all ones) this fits both factors
    (`reduce = Vᵀ M`, 1x1 `V`) on the rewritten model's inputs at once, with no alternation."""
    m, b = equations.solve(ridge)
    n = equations.a.shape[0] - 1
    rows = max(equations.rows, 1)
    mean = equations.a[:n, n] / rows
    centred = equations.a[:n, :n] / rows - np.outer(mean, mean)
    fitted = m @ centred @ m.T
    vals, vecs = np.linalg.eigh((fitted + fitted.T) / 2)
    v = vecs[:, np.argsort(vals)[::-1][:rank]]
    reduce = v.T @ m
    bias = b + (m - v @ reduce) @ mean  # the mean of the dropped directions stays in the bias
    p, vt = _balance(reduce, v.T)
    return Factors(p, vt.T.reshape(len(v), rank, *kernel), bias)


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


@dataclass(frozen=True)
class Tucker2Fit:
    """A Tucker-2 fit and its estimated relative output error after the init and each ALS
    sweep (non-increasing: every half-step maximises the kept energy given the other factor)."""

    tucker: Tucker2
    errors: list[float]

    @property
    def error(self) -> float:
        return self.errors[-1]


def _top_eigvecs(gram: np.ndarray, count: int) -> np.ndarray:
    vals, vecs = np.linalg.eigh((gram + gram.T) / 2)
    return vecs[:, np.argsort(vals)[::-1][:count]]


def tucker2_als(
    weight: np.ndarray, sigma: np.ndarray | None, rank_in: int, rank_out: int,
    bias: np.ndarray | None = None, iters: int = DEFAULT_ALS_ITERS,
    alpha: float = DEFAULT_SHRINK, tol: float = DEFAULT_NULL_TOL, stop: float = 1e-6,
) -> Tucker2Fit:
    """Tucker-2 `W ≈ restore ∘ core ∘ reduce` minimising the output error under the input
    moment Σ (Kalle et al. 2025): in whitened input coordinates `T = Σ^{1/2} M` this is a
    plain Tucker-2 of T, fitted by alternating least squares (HOOI): the input factor and the
    output factor in turn are the top eigenvectors given the other, the core `Qᵀ T U` in closed
    form. Stops after `iters` sweeps or when a sweep gains less than `stop` (relative).
    `sigma=None` fits the weights themselves (data-free)."""
    o, c = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    m = unfold_input(weight)  # [C, O·K]
    if sigma is None:
        white = Whitening(np.eye(c), np.eye(c))
    else:
        white = whitening(shrink_covariance(np.asarray(sigma, np.float64), alpha, 0.0), tol)
    k = white.rank
    t = (white.root @ m).reshape(k, o, -1)  # [k, O, K]
    total = float(np.sum(t**2))
    r_in, r_out = min(rank_in, k), min(rank_out, o)
    u = thin_svd(t.reshape(k, -1))[0][:, :r_in]  # the whitened `in` solution

    def output_step(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        tu = np.einsum("jb,jok->bok", u, t)  # [r_in, O, K]
        q = _top_eigvecs(np.einsum("bok,bpk->op", tu, tu), r_out)
        core = np.einsum("oa,bok->abk", q, tu)  # [r_out, r_in, K]
        kept = float(np.sum(core**2))
        return q, core, math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0

    q, core, err = output_step(u)
    errors = [err]
    for _ in range(max(0, iters)):
        tq = np.einsum("jok,oa->jak", t, q)  # [k, r_out, K]
        u = _top_eigvecs(np.einsum("jak,iak->ji", tq, tq), r_in)
        q, core, err = output_step(u)
        errors.append(err)
        if errors[-2] - err <= stop * max(errors[-2], 1e-300):
            break
    reduce = (white.pinv_root @ u).T  # [r_in, C]
    if r_in < rank_in:  # more rank than the data has directions: the fit is exact already
        reduce = np.pad(reduce, [(0, rank_in - r_in), (0, 0)])
        core = np.pad(core, [(0, 0), (0, rank_in - r_in), (0, 0)])
    norms = np.linalg.norm(reduce, axis=1)
    norms[norms == 0] = 1.0
    reduce, core = reduce / norms[:, None], core * norms[None, :, None]
    return Tucker2Fit(
        Tucker2(reduce, core.reshape(core.shape[0], rank_in, *kernel), q,
                None if bias is None else np.asarray(bias, np.float64)),
        errors,
    )


def fit_error(weight: np.ndarray, sigma: np.ndarray | None, rank: int,
              rank_out: int | None = None, alpha: float = DEFAULT_SHRINK,
              iters: int = DEFAULT_ALS_ITERS) -> float:
    """Estimated relative output error of the best fit at these ranks under the input moment
    (`sigma=None`: of the weights): `mode=in` (`rank_out=None`) in closed form from the
    whitened spectrum, `mode=in-out` by Tucker-2 ALS. What a planner compares per MAC to
    choose a layer's mode; the same whitened norm for both, so the numbers are comparable."""
    if rank_out is None:
        spectrum = (svd_spectrum(weight) if sigma is None
                    else whitened_spectrum(weight, sigma, alpha))
        return spectrum.relative_error(rank)
    return tucker2_als(weight, sigma, rank, rank_out, iters=iters, alpha=alpha).error


def tucker2_reconstruct(t: Tucker2) -> np.ndarray:
    return reconstruct(Factors(t.reduce, np.einsum("oa,a...->o...", t.restore, t.core), t.bias))


def predict_rows(fit: Factors | Tucker2, patches: np.ndarray) -> np.ndarray:
    """The factorized layer's outputs `[n, O]` from patches of its reduced input `[n, r·K]`."""
    if isinstance(fit, Tucker2):
        kernel = np.einsum("oa,a...->o...", fit.restore, fit.core)
    else:
        kernel = fit.kernel
    out = patches @ kernel.reshape(kernel.shape[0], -1).T
    return out if fit.bias is None else out + fit.bias


def scale_outputs(fit: Factors | Tucker2, scale: np.ndarray, shift: np.ndarray
                  ) -> Factors | Tucker2:
    """`y ← scale·y + shift` per output channel, folded into the last conv and its bias."""
    bias = (np.zeros(len(scale)) if fit.bias is None else fit.bias) * scale + shift
    if isinstance(fit, Tucker2):
        return Tucker2(fit.reduce, fit.core, fit.restore * scale[:, None], bias)
    kernel = fit.kernel * scale.reshape(-1, *([1] * (fit.kernel.ndim - 1)))
    return Factors(fit.reduce, kernel, bias)


def post_activation_fit(fit: Factors | Tucker2, patches: np.ndarray, targets: np.ndarray,
                        activation: str) -> tuple[Factors | Tucker2, float, float]:
    """Refit each output channel's scale and shift so that `act(ŷ)` matches `act(y)` on kept
    rows (see `activation_affine`); returns the new fit and the relative post-activation error
    before and after (on those rows)."""
    act = ACTIVATIONS[activation][0]
    pred = predict_rows(fit, patches)
    goal = act(np.asarray(targets, np.float64))
    norm = float(np.linalg.norm(goal)) or 1.0
    before = float(np.linalg.norm(act(pred) - goal)) / norm
    scale, shift = activation_affine(pred, targets, activation)
    after = float(np.linalg.norm(act(pred * scale + shift) - goal)) / norm
    return scale_outputs(fit, scale, shift), before, after


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
