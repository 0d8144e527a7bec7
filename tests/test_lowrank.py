"""The factorization math of `rewriter.lowrank`, checked against torch convolutions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewriter import lowrank


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, window: lowrank.Window,
          out_dims=None) -> np.ndarray:
    """Reference conv in torch with explicit (possibly asymmetric) zero padding."""
    spatial = w.ndim - 2
    if out_dims is None:
        begin, end = window.pads[:spatial], window.pads[spatial:]
    else:
        begin = window.pad_begin(x.shape[2:], out_dims)
        end = [max(0, (o - 1) * s + (k - 1) * d + 1 - n - bb)
               for o, s, k, d, n, bb in zip(out_dims, window.strides, window.kernel,
                                            window.dilations, x.shape[2:], begin, strict=True)]
    pad = [p for axis in reversed(range(spatial)) for p in (begin[axis], end[axis])]
    xt = F.pad(torch.from_numpy(x), pad)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    out = conv(xt, torch.from_numpy(w), None if b is None else torch.from_numpy(b),
               stride=window.strides, dilation=window.dilations)
    return out.numpy()


def _low_rank_weight(rng, o: int, c: int, kernel, rank: int) -> np.ndarray:
    k = int(np.prod(kernel))
    return np.einsum("ork,rc->ock", rng.standard_normal((o, rank, k)),
                     rng.standard_normal((rank, c))).reshape(o, c, *kernel)


def test_unfold_and_fold_are_inverse():
    w = np.random.default_rng(0).standard_normal((6, 4, 3, 2))
    m = lowrank.unfold_input(w)
    assert m.shape == (4, 6 * 6)
    np.testing.assert_array_equal(lowrank.fold_kernel(m, 6, (3, 2)), w)


@pytest.mark.parametrize("init", ["svd", "whitened"])
def test_full_rank_factors_reconstruct_the_kernel(init):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 5, 3, 3))
    if init == "svd":
        factors = lowrank.svd_init(w, 5)
    else:
        x = rng.standard_normal((4, 5, 6, 6)) * np.arange(1, 6)[None, :, None, None]
        factors = lowrank.whitened_init(w, lowrank.moments_from_batches([x]), 5)
    assert lowrank.relative_error(w, lowrank.reconstruct(factors)) < 1e-10
    assert np.allclose(np.linalg.norm(factors.reduce, axis=1), 1.0)


@pytest.mark.parametrize(
    ("shape", "kernel", "strides", "dilations", "pads", "auto_pad"),
    [
        ((2, 3, 9, 10), (3, 3), (2, 2), (1, 1), (1, 0, 2, 1), "NOTSET"),
        ((2, 3, 9, 10), (3, 2), (1, 2), (2, 1), (0, 0, 0, 0), "SAME_UPPER"),
        ((2, 3, 9, 10), (3, 3), (2, 1), (1, 1), (0, 0, 0, 0), "SAME_LOWER"),
        ((2, 3, 9, 10), (3, 3), (1, 1), (1, 2), (0, 0, 0, 0), "VALID"),
        ((1, 4, 17), (5,), (3,), (1,), (2, 1), "NOTSET"),
        ((1, 2, 5, 6, 7), (3, 3, 3), (1, 2, 1), (1, 1, 1), (1, 1, 1, 1, 1, 1), "NOTSET"),
    ],
)
def test_im2col_matches_conv(shape, kernel, strides, dilations, pads, auto_pad):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((4, shape[1], *kernel))
    window = lowrank.Window(kernel, strides, dilations, pads, auto_pad)
    spatial = shape[2:]
    if auto_pad.startswith("SAME"):
        out_dims = [-(-n // s) for n, s in zip(spatial, strides, strict=True)]
    else:
        full = spatial if auto_pad == "VALID" else [
            n + pads[a] + pads[a + len(spatial)] for a, n in enumerate(spatial)]
        out_dims = [(n - (k - 1) * d - 1) // s + 1
                    for n, k, d, s in zip(full, kernel, dilations, strides, strict=True)]
    y = _conv(x, w, None, window, out_dims)
    assert list(y.shape[2:]) == out_dims
    positions = lowrank.sample_positions(shape[0], out_dims, None, np.random.default_rng(0))
    patches = lowrank.gather_patches(x, window, out_dims, positions)
    expected = lowrank.gather_outputs(y, positions)
    np.testing.assert_allclose(patches @ w.reshape(4, -1).T, expected, rtol=1e-9, atol=1e-9)


def test_whitened_beats_svd_on_the_data_it_was_fitted_on():
    rng = np.random.default_rng(3)
    c, o = 16, 12
    w = rng.standard_normal((o, c, 3, 3))
    mix = rng.standard_normal((c, c)) * np.linspace(0.05, 3, c)  # correlated, uneven channels
    x = np.einsum("dc,nc...->nd...", mix, rng.standard_normal((8, c, 8, 8)))
    sigma = lowrank.moments_from_batches([x])
    window = lowrank.Window((3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    y = _conv(x, w, None, window)
    errors = {}
    for name, factors in {
        "svd": lowrank.svd_init(w, 4),
        "whitened": lowrank.whitened_init(w, sigma, 4, alpha=0.0),
    }.items():
        approx = _conv(x, lowrank.reconstruct(factors), None, window)
        errors[name] = lowrank.relative_error(y, approx)
    assert errors["whitened"] < errors["svd"]


def test_refit_recovers_a_low_rank_layer_exactly_and_fits_bias():
    rng = np.random.default_rng(4)
    w = _low_rank_weight(rng, 10, 12, (3, 3), 6)
    b = rng.standard_normal(10)
    x = rng.standard_normal((6, 12, 9, 9))
    window = lowrank.Window((3, 3), (2, 2), (1, 1), (1, 1, 0, 0))
    y = _conv(x, w, b, window)
    start = lowrank.svd_init(w + 0.3 * rng.standard_normal(w.shape), 6)  # a wrong kernel
    acc = lowrank.RefitAccumulator(lowrank.svd_init(w, 6).reduce, 10, window, None)
    acc.add(x[:3], y[:3])
    acc.add(x[3:], y[3:])  # accumulated over two batches
    refit = acc.solve(ridge=0.0)
    assert lowrank.relative_error(w, lowrank.reconstruct(refit)) < 1e-8
    np.testing.assert_allclose(refit.bias, b, atol=1e-8)
    assert start.rank == refit.rank


def test_refit_with_subsampled_positions_is_close():
    rng = np.random.default_rng(5)
    w = _low_rank_weight(rng, 8, 8, (3, 3), 4)
    x = rng.standard_normal((4, 8, 16, 16))
    window = lowrank.Window((3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    y = _conv(x, w, None, window)
    acc = lowrank.RefitAccumulator(lowrank.svd_init(w, 4).reduce, 8, window, max_positions=200)
    acc.add(x, y)
    assert acc.equations.rows == 200
    assert lowrank.relative_error(w, lowrank.reconstruct(acc.solve(0.0))) < 1e-8


def test_reduce_refit_recovers_p_for_a_fixed_kernel():
    rng = np.random.default_rng(6)
    w = _low_rank_weight(rng, 6, 7, (3, 3), 3)
    x = rng.standard_normal((3, 7, 8, 8))
    window = lowrank.Window((3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    y = _conv(x, w, None, window)
    exact = lowrank.svd_init(w, 3)
    acc = lowrank.ReduceRefitAccumulator(exact.kernel, None, window, 7)
    positions = lowrank.sample_positions(3, y.shape[2:], None, np.random.default_rng(0))
    acc.add_rows(x[:2], y.shape[2:], positions[positions[:, 0] < 2],
                 lowrank.gather_outputs(y[:2], positions[positions[:, 0] < 2]))
    rest = lowrank.sample_positions(1, y.shape[2:], None, np.random.default_rng(0))
    acc.add_rows(x[2:], y.shape[2:], rest, lowrank.gather_outputs(y[2:], rest))
    np.testing.assert_allclose(acc.solve(0.0), exact.reduce, atol=1e-7)


def test_reduced_rank_fit_is_the_best_rank_r_map_and_exact_at_the_true_rank():
    """Both 1x1 factors from one regression: at the map's true rank it recovers it exactly
    (bias included, inputs with a mean); below it, no truncated SVD of the full solution and no
    perturbation of the fitted factors does better (the Eckart–Young optimum under the data)."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4000, 16)) @ rng.standard_normal((16, 16)) + 2.0
    m = rng.standard_normal((12, 5)) @ rng.standard_normal((5, 16))
    y = x @ m.T + rng.standard_normal(12)

    def error(f: lowrank.Factors, targets: np.ndarray) -> float:
        pred = x @ f.reduce.T @ f.kernel[:, :, 0, 0].T + f.bias
        return float(np.linalg.norm(pred - targets) / np.linalg.norm(targets - targets.mean(0)))

    exact = lowrank.NormalEquations(16, 12)
    exact.add(x, y)
    fit = lowrank.reduced_rank_fit(exact, 5, [1, 1], ridge=0.0)
    assert fit.reduce.shape == (5, 16) and fit.kernel.shape == (12, 5, 1, 1)
    assert error(fit, y) < 1e-8
    noisy_y = y + 3.0 * rng.standard_normal(y.shape)
    noisy = lowrank.NormalEquations(16, 12)
    noisy.add(x, noisy_y)
    best = lowrank.reduced_rank_fit(noisy, 3, [1, 1], ridge=0.0)
    full, _ = noisy.solve(0.0)
    u, s, vt = np.linalg.svd(full)
    truncated = u[:, :3] * s[:3] @ vt[:3]
    bias = (noisy_y - x @ truncated.T).mean(0)
    svd_fit = lowrank.Factors(vt[:3], (u[:, :3] * s[:3]).reshape(12, 3, 1, 1), bias)
    assert error(best, noisy_y) < error(svd_fit, noisy_y)
    for _ in range(5):
        nudged = lowrank.Factors(best.reduce + 1e-3 * rng.standard_normal(best.reduce.shape),
                                 best.kernel, best.bias)
        assert error(best, noisy_y) <= error(nudged, noisy_y)


def test_tucker2_full_rank_is_exact_and_truncation_uses_data():
    rng = np.random.default_rng(7)
    w = rng.standard_normal((6, 5, 3, 3))
    factors = lowrank.svd_init(w, 5, rng.standard_normal(6))
    full = lowrank.restore_outputs(factors, 6)
    assert lowrank.relative_error(w, lowrank.tucker2_reconstruct(full)) < 1e-10
    assert full.core.shape == (6, 5, 3, 3) and full.restore.shape == (6, 6)
    cut = lowrank.restore_outputs(factors, 3, np.eye(45))
    assert cut.core.shape == (3, 5, 3, 3) and cut.restore.shape == (6, 3)


def test_energy_rank_and_error_estimate():
    s = lowrank.Spectrum(np.eye(4), np.array([3.0, 2.0, 1.0, 0.0]), np.eye(4))
    assert lowrank.rank_for_energy(s, 0.9) == 2  # 13/14 of the energy in two values
    assert lowrank.rank_for_energy(s, 1.0) == 3
    assert s.relative_error(2) == pytest.approx(np.sqrt(1 / 14))
    assert lowrank.round_up(3, 8, 64) == 8 and lowrank.round_up(9, 8, 12) == 12


def test_shrinkage_moves_toward_the_diagonal():
    sigma = np.array([[2.0, 1.0], [1.0, 1.0]])
    out = lowrank.shrink_covariance(sigma, alpha=0.2, eps=0.0)
    np.testing.assert_allclose(out, [[2.0, 0.8], [0.8, 1.0]])


def test_allocation_takes_cheap_error_first_and_stops_at_target():
    cheap = lowrank.LayerChoices("a", [8, 4], [50, 80], [0.01, 0.02])
    costly = lowrank.LayerChoices("b", [8, 4], [50, 80], [0.5, 0.9])
    alloc = lowrank.allocate_ranks([cheap, costly], 70)
    assert alloc.ranks == {"a": 4} and alloc.reached
    alloc = lowrank.allocate_ranks([cheap, costly], 120)
    assert alloc.ranks["a"] == 4 and "b" in alloc.ranks and alloc.macs_saved >= 120
    assert not lowrank.allocate_ranks([cheap], 1000).reached


def _rank_deficient_inputs(rng, c: int, d: int, n: int = 400) -> np.ndarray:
    """`[n, C]` channel vectors spanning only d < C directions, one channel dead."""
    mix = rng.standard_normal((c, d)) * np.linspace(0.2, 3.0, d)
    x = rng.standard_normal((n, d)) @ mix.T
    x[:, 0] = 0.0  # a dead channel (e.g. a pruned or always-negative ReLU input)
    return x


@pytest.mark.parametrize("rank", [1, 3, 5, 6, 9])
def test_whitening_attains_the_best_output_error_on_rank_deficient_inputs(rank):
    rng = np.random.default_rng(11)
    c, d, o = 12, 6, 7
    x = _rank_deficient_inputs(rng, c, d)
    w = rng.standard_normal((o, c, 3, 3))
    m = lowrank.unfold_input(w)  # [C, O·K]
    sigma = x.T @ x / len(x)
    factors = lowrank.whitened_init(w, sigma, rank, alpha=0.0)
    assert factors.reduce.shape == (rank, c) and np.all(np.isfinite(factors.reduce))
    approx = lowrank.unfold_input(lowrank.reconstruct(factors))
    got = np.linalg.norm(x @ (m - approx))
    # Eckart-Young: no rank-r kernel can do better than the tail of the outputs' spectrum
    s = np.linalg.svd(x @ m, compute_uv=False)
    best = np.sqrt(np.sum(s[rank:] ** 2))
    assert got == pytest.approx(best, rel=1e-7, abs=1e-7 * np.linalg.norm(x @ m))


def test_whitening_ignores_directions_the_data_never_takes():
    rng = np.random.default_rng(12)
    c, d = 10, 4
    x = _rank_deficient_inputs(rng, c, d)
    sigma = x.T @ x / len(x)
    w = rng.standard_normal((8, c, 3, 3))
    p = lowrank.whitened_init(w, sigma, 3, alpha=0.0).reduce
    vals, vecs = np.linalg.eigh(sigma)
    null = vecs[:, vals < 1e-9 * vals.max()]
    assert null.shape[1] == c - d
    # rows are unit norm and carry nothing along the null space: noise there is not amplified
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0)
    assert np.abs(p @ null).max() < 1e-8
    assert np.linalg.cond(p) < 1e3
    white = lowrank.whitening(sigma)
    assert white.rank == np.linalg.matrix_rank(sigma)
    np.testing.assert_allclose(white.root.T @ white.root, sigma, atol=1e-9 * vals.max())


def test_whitening_of_an_all_zero_input_stays_finite():
    w = np.random.default_rng(13).standard_normal((4, 3, 3, 3))
    factors = lowrank.whitened_init(w, np.zeros((3, 3)), 2, alpha=0.0)
    assert factors.reduce.shape == (2, 3) and np.all(np.isfinite(factors.kernel))


def _whitened_error(w: np.ndarray, approx: np.ndarray, x: np.ndarray) -> float:
    """Relative error of the per-offset outputs `xᵀ M` over channel vectors x `[n, C]`."""
    m, a = lowrank.unfold_input(w), lowrank.unfold_input(approx)
    return float(np.linalg.norm(x @ (m - a)) / np.linalg.norm(x @ m))


def test_tucker2_als_is_monotone_bounded_and_beats_sequential_truncation():
    rng = np.random.default_rng(14)
    c, o = 16, 20
    x = rng.standard_normal((600, c)) @ (rng.standard_normal((c, c)) * np.linspace(0.1, 2, c))
    sigma = x.T @ x / len(x)
    w = rng.standard_normal((o, c, 3, 3))
    fit = lowrank.tucker2_als(w, sigma, 6, 8, iters=25, alpha=0.0, stop=0.0)
    assert 3 <= len(fit.errors) <= 26  # init + a bounded number of sweeps
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(fit.errors))  # raw, per sweep
    assert fit.errors[-1] < fit.errors[0]  # the alternation improved on its init
    t = fit.tucker
    assert t.reduce.shape == (6, c) and t.core.shape == (8, 6, 3, 3) and t.restore.shape == (o, 8)
    got = _whitened_error(w, lowrank.tucker2_reconstruct(t), x)
    assert got == pytest.approx(fit.error, rel=1e-6)  # the reported error is the real one
    # the old way: whitened `in` factors, then the kernel split by its own SVD
    seq = lowrank.restore_outputs(lowrank.whitened_init(w, sigma, 6, alpha=0.0), 8)
    assert got < _whitened_error(w, lowrank.tucker2_reconstruct(seq), x)
    assert lowrank.fit_error(w, sigma, 6, 8, alpha=0.0) == pytest.approx(fit.error, rel=1e-3)


def test_tucker2_als_full_ranks_are_exact_and_stop_early():
    rng = np.random.default_rng(15)
    w = rng.standard_normal((5, 4, 3, 3))
    x = _rank_deficient_inputs(rng, 4, 3)
    fit = lowrank.tucker2_als(w, x.T @ x / len(x), 4, 5, alpha=0.0)
    assert fit.error < 1e-7 and len(fit.errors) <= 3
    assert _whitened_error(w, lowrank.tucker2_reconstruct(fit.tucker), x) < 1e-7
    data_free = lowrank.tucker2_als(w, None, 4, 5)
    assert lowrank.relative_error(w, lowrank.tucker2_reconstruct(data_free.tucker)) < 1e-10


def test_fit_error_in_mode_is_the_whitened_spectrum_tail():
    rng = np.random.default_rng(16)
    w = rng.standard_normal((6, 8, 3, 3))
    x = rng.standard_normal((300, 8)) * np.linspace(0.1, 3, 8)
    sigma = x.T @ x / len(x)
    factors = lowrank.whitened_init(w, sigma, 3, alpha=0.0)
    got = _whitened_error(w, lowrank.reconstruct(factors), x)
    assert lowrank.fit_error(w, sigma, 3, alpha=0.0) == pytest.approx(got, rel=1e-6)


def test_bias_correction_matches_the_mean_output():
    rng = np.random.default_rng(17)
    c, o = 6, 5
    x = rng.standard_normal((4, c, 10, 10)) + np.linspace(-2, 3, c)[None, :, None, None]
    w = rng.standard_normal((o, c, 3, 3))
    b = rng.standard_normal(o)
    window = lowrank.Window((3, 3), (1, 1), (1, 1), (0, 0, 0, 0))
    approx = lowrank.svd_init(w, 2, b)
    w_hat = lowrank.reconstruct(approx)
    positions = lowrank.sample_positions(4, (8, 8), None, np.random.default_rng(0))
    patches = lowrank.gather_patches(x, window, (8, 8), positions)
    y = _conv(x, w, b, window)
    shift_before = np.abs(_conv(x, w_hat, b, window).mean(axis=(0, 2, 3)) - y.mean((0, 2, 3)))
    mean_patch = patches.mean(axis=0).reshape(c, 3, 3)
    fixed = lowrank.corrected_bias(w, w_hat, b, mean_patch)
    after = _conv(x, w_hat, fixed, window).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(after, y.mean(axis=(0, 2, 3)), atol=1e-9)
    assert shift_before.max() > 0.1  # there was a shift to correct
    moment = lowrank.SecondMoment(c)
    moment.add(x)  # the channel mean alone gets close (borders aside)
    coarse = lowrank.corrected_bias(w, w_hat, b, moment.mean())
    shift_coarse = np.abs(_conv(x, w_hat, coarse, window).mean(axis=(0, 2, 3)) - y.mean((0, 2, 3)))
    assert shift_coarse.max() < 0.5 * shift_before.max()


def test_activation_affine_lowers_the_post_silu_error_and_never_raises_it():
    rng = np.random.default_rng(18)
    y = rng.standard_normal((2000, 4)) * 2 - 0.5
    pred = 0.8 * y + 0.3 + 0.05 * rng.standard_normal(y.shape)  # shrunk and shifted
    pred[:, 3] = y[:, 3]  # an exact channel stays exact
    scale, shift = lowrank.activation_affine(pred, y, "Silu")
    before = np.sum((lowrank.silu(pred) - lowrank.silu(y)) ** 2, axis=0)
    after = np.sum((lowrank.silu(pred * scale + shift) - lowrank.silu(y)) ** 2, axis=0)
    assert np.all(after <= before + 1e-12)
    assert np.all(after[:3] < 0.2 * before[:3])
    np.testing.assert_allclose([scale[3], shift[3]], [1.0, 0.0], atol=1e-6)
    grad = (lowrank.silu(y + 1e-6) - lowrank.silu(y - 1e-6)) / 2e-6
    np.testing.assert_allclose(lowrank.silu_grad(y), grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("tucker", [False, True])
def test_post_activation_fit_lowers_the_error_after_silu_on_the_real_conv(tucker):
    rng = np.random.default_rng(19)
    c, o = 8, 6
    w = rng.standard_normal((o, c, 3, 3)) * 0.4
    b = rng.standard_normal(o) - 1.0
    x = rng.standard_normal((4, c, 10, 10))
    window = lowrank.Window((3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    y = _conv(x, w, b, window)
    start = lowrank.svd_init(w, 3)
    acc = lowrank.RefitAccumulator(start.reduce, o, window, max_positions=150, keep_rows=250)
    acc.add(x[:2], y[:2])
    acc.add(x[2:], y[2:])
    patches, targets = acc.kept_rows()
    assert patches.shape == (250, 3 * 9) and targets.shape == (250, o)
    fit = acc.solve(0.0)
    if tucker:
        fit = lowrank.restore_outputs(fit, 4, acc.equations.input_moment())
    new, before, after = lowrank.post_activation_fit(fit, patches, targets, "Silu")
    assert after <= before
    # measured on the whole maps through real convolutions, not only on the kept rows
    def post(f):
        kernel = (np.einsum("oa,a...->o...", f.restore, f.core) if tucker else f.kernel)
        z = np.einsum("rc,nc...->nr...", f.reduce, x)
        return lowrank.silu(_conv(z, kernel, f.bias, window))
    ref = lowrank.silu(y)
    assert lowrank.relative_error(ref, post(new)) < lowrank.relative_error(ref, post(fit))


def test_in_out_error_estimate_is_the_als_init_and_bounds_als():
    rng = np.random.default_rng(20)
    w = rng.standard_normal((12, 10, 3, 3))
    x = rng.standard_normal((300, 10)) * np.linspace(0.2, 2, 10)
    sigma = x.T @ x / len(x)
    spectrum = lowrank.whitened_spectrum(w, sigma, alpha=0.0)
    fit = lowrank.tucker2_als(w, sigma, 4, 6, alpha=0.0)
    estimate = spectrum.in_out_error(4, 6, 12)
    assert estimate == pytest.approx(fit.errors[0], rel=1e-9)
    assert fit.error <= estimate
    assert spectrum.in_out_error(4, 12, 12) == pytest.approx(spectrum.relative_error(4))
