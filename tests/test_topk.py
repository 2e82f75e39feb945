"""The device top-k (`retribert_jax.topk`): the screen's proof of exactness, against numpy's float64 brute force."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retribert_jax import topk


def brute_force(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best rows in the total order (score descending, row ascending), scores in float64; NaN rows never hit."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.lexsort((np.broadcast_to(np.arange(x.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def padded(x: np.ndarray, block: int) -> jax.Array:
    rows = np.zeros((-(-x.shape[0] // block) * block, x.shape[1]), x.dtype)
    rows[: x.shape[0]] = x
    return jnp.asarray(rows)


def screened(q, x, k, **kw):
    rows = padded(x, kw.get("block", 256))
    residual = kw.pop("residual", topk.row_residual(x, kw.get("screen_dtype", "float32")))
    top, hit, exact, needed = topk.screened_topk(
        jnp.asarray(q), rows, jnp.int32(x.shape[0]), jnp.float32(topk.row_norm(x)), jnp.float32(residual), k=k, **kw
    )
    return np.asarray(top), np.asarray(hit), np.asarray(exact), np.asarray(needed)


@pytest.mark.parametrize("screen_dtype", ["float32", "bfloat16"])
def test_screened_topk_equals_brute_force_where_it_says_exact(screen_dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 32)).astype(np.float32)
    q = rng.standard_normal((64, 32)).astype(np.float32)
    top, hit, exact, needed = screened(
        q, x, 20, block=256, group=8, coarse=4, candidates=128, screen_dtype=screen_dtype
    )
    ref_s, ref_r = brute_force(q, x, 20)
    assert exact.mean() > 0.9, f"only {exact.mean():.2f} of the queries proven exact; needed {needed.max()} groups"
    # Ids equal up to scores within float32 rounding of each other (a near-tie may order either way).
    differ = hit[exact] != ref_r[exact]
    assert not differ.any() or np.abs(top[exact][differ] - ref_s[exact][differ]).max() < 1e-4, (
        f"{differ.sum()} hits differ from the brute force beyond a near-tie"
    )
    np.testing.assert_allclose(top, ref_s, rtol=0, atol=2e-5)


def test_screened_topk_keeps_ties_in_row_order_and_skips_nan_and_padding():
    rng = np.random.default_rng(1)
    x = np.repeat(rng.standard_normal((40, 16)).astype(np.float32), 25, axis=0)  # every row 25 times
    x[7] = np.nan
    q = rng.standard_normal((8, 16)).astype(np.float32)
    top, hit, exact, _ = screened(q, x, 60, block=128, group=4, coarse=4, candidates=64, screen_dtype="float32")
    _, ref_r = brute_force(q, x, 60)
    assert exact.all()
    np.testing.assert_array_equal(hit, ref_r)  # equal scores: the lower row first, exactly as one stable top-k
    assert 7 not in hit and (hit < x.shape[0]).all()


def test_screened_topk_says_when_it_cannot_prove_the_result_and_how_long_a_shortlist_would():
    """A shortlist shorter than the groups that reach the bar is said, at either level (coarse groups of 2 or of 8
    fine groups), with a count; searched again with a shortlist that long, every query is proven, and equals the
    brute force."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4096, 16)).astype(np.float32)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    ref_s, ref_r = brute_force(q, x, 8)
    wide = 2.0**-5 * topk.row_norm(x)  # a residual bound 8x the worst case: valid, and a wide bar
    for coarse in (2, 8):
        kw = dict(block=64, group=8, coarse=coarse, screen_dtype="bfloat16", residual=wide)
        _, _, exact, needed = screened(q, x, 8, candidates=8, **kw)
        assert (needed > 8).all() and not exact.any()
        top, hit, exact, again = screened(q, x, 8, candidates=int(needed.max()), **kw)
        assert exact.all() and (again <= needed.max()).all()
        np.testing.assert_array_equal(hit, ref_r)
        np.testing.assert_allclose(top, ref_s, rtol=0, atol=2e-5)


def test_screened_topk_fewer_rows_than_k_and_a_nan_query():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 8)).astype(np.float32)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    q[1] = np.nan
    top, hit, exact, _ = screened(q, x, 16, block=16, group=4, coarse=2, candidates=16, screen_dtype="float32")
    ref_s, ref_r = brute_force(q[[0, 2]], x, 10)
    np.testing.assert_array_equal(hit[[0, 2], :10], ref_r)
    assert (hit[[0, 2], 10:] == -1).all() and np.isneginf(top[[0, 2], 10:]).all()
    assert (hit[1] == -1).all() and not exact[1]


def test_screen_error_bounds_the_bfloat16_screen():
    """The bound holds on vectors built to make bfloat16 rounding hurt: mixed magnitudes, cancellation."""
    rng = np.random.default_rng(4)
    dim = 128
    x = (rng.standard_normal((2048, dim)) * np.exp(rng.uniform(-6, 6, (2048, dim)))).astype(np.float32)
    q = (rng.standard_normal((64, dim)) * np.exp(rng.uniform(-6, 6, (64, dim)))).astype(np.float32)
    exact = q.astype(np.float64) @ x.astype(np.float64).T
    f32 = np.asarray(jnp.einsum("qd,nd->qn", q, x, precision=topk.HIGHEST))
    bf16 = np.asarray(
        jnp.einsum(
            "qd,nd->qn", jnp.asarray(q, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16), preferred_element_type=jnp.float32
        )
    )
    scale = np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(x, axis=1)[None, :]
    for name, approx in (("float32", f32), ("bfloat16", bf16)):
        ratio = np.abs(approx - f32 if name == "bfloat16" else approx - exact) / scale
        assert ratio.max() <= topk.screen_error(name, dim), f"{name}: error {ratio.max():.3g} |q||x| past the bound"
    # And the bound is not vacuous: bfloat16 rounding really moves scores by a good part of it.
    assert (np.abs(bf16 - f32) / scale).max() > topk.screen_error("bfloat16", dim) / 50


def test_screen_bound_holds_from_the_index_own_residuals_and_is_tighter_than_the_worst_case():
    """`screen_bound` from measured residuals bounds the bfloat16 screen on vectors built to make rounding hurt, as
    on plain Gaussian ones; it never exceeds `screen_error`'s worst case and, on Gaussian vectors, is about half of it;
    a float32 screen's bound is `screen_error`'s."""
    rng = np.random.default_rng(4)
    dim = 128
    for spread in (6.0, 0.0):
        x = (rng.standard_normal((2048, dim)) * np.exp(rng.uniform(-spread, spread, (2048, dim)))).astype(np.float32)
        q = (rng.standard_normal((64, dim)) * np.exp(rng.uniform(-spread, spread, (64, dim)))).astype(np.float32)
        f32 = np.asarray(jnp.einsum("qd,nd->qn", q, x, precision=topk.HIGHEST))
        bf16 = np.asarray(
            jnp.einsum(
                "qd,nd->qn",
                jnp.asarray(q, jnp.bfloat16),
                jnp.asarray(x, jnp.bfloat16),
                preferred_element_type=jnp.float32,
            )
        )
        norm, residual = jnp.float32(topk.row_norm(x)), jnp.float32(topk.row_residual(x, "bfloat16"))
        bound = np.asarray(topk.screen_bound(jnp.asarray(q), "bfloat16", norm, residual))
        assert (np.abs(bf16 - f32).max(axis=1) <= bound).all(), "a bfloat16 score moved past its bound"
        worst = topk.screen_error("bfloat16", dim) * np.linalg.norm(q, axis=1) * float(norm)
        assert (bound <= worst * (1 + 1e-6)).all()
        if spread == 0.0:
            assert (bound < 0.7 * worst).all(), f"bound / worst case up to {(bound / worst).max():.2f}"
        f32_bound = np.asarray(topk.screen_bound(jnp.asarray(q), "float32", norm, jnp.float32(0.0)))
        np.testing.assert_allclose(
            f32_bound, topk.screen_error("float32", dim) * np.linalg.norm(q, axis=1) * float(norm), rtol=1e-5
        )
    assert topk.row_residual(x, "float32") == 0.0


def test_a_bfloat16_screen_proves_more_queries_with_measured_residuals():
    """On Gaussian rows the measured residual lets fewer groups pass the bar than the worst case (u |x|), so the
    shortlist proves more queries; both results agree with the brute force where proven."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((16384, 64)).astype(np.float32)
    q = rng.standard_normal((64, 64)).astype(np.float32)
    kw = dict(block=1024, group=8, coarse=16, candidates=24, screen_dtype="bfloat16")
    worst = 2.0**-8 * topk.row_norm(x)
    measured = screened(q, x, 16, **kw)
    bounded = screened(q, x, 16, residual=worst, **kw)
    ref_s, _ = brute_force(q, x, 16)
    for top, _, exact, _ in (measured, bounded):
        np.testing.assert_allclose(top[exact], ref_s[exact], rtol=0, atol=2e-5)
    # Measured here: 54 vs 36 of the 64 queries proven; with measured residuals 21.3 groups qualify on average.
    assert measured[3].mean() < bounded[3].mean(), (measured[3].mean(), bounded[3].mean())
    assert measured[2].sum() >= bounded[2].sum() + 10, (measured[2].sum(), bounded[2].sum())


@pytest.mark.parametrize("k", [1, 7, 300])
def test_blocked_topk_equals_brute_force(k):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1000, 24)).astype(np.float32)
    q = rng.standard_normal((9, 24)).astype(np.float32)
    top, hit = topk.blocked_topk(jnp.asarray(q), padded(x, 128), jnp.int32(1000), k=k, block=128)
    ref_s, ref_r = brute_force(q, x, k)
    np.testing.assert_array_equal(np.asarray(hit), ref_r)
    np.testing.assert_allclose(np.asarray(top), ref_s, atol=2e-5)


@pytest.mark.parametrize("form", ["int8", "binary"])
def test_compressed_shortlist_is_the_best_rows_by_the_approximate_score(form):
    """Rows by approximate score, not whole groups: the result is exactly the `rows_out` best rows by
    `(q @ W.T) . code`, computed here in float64 from the decoded codes."""
    from retribert_jax import quantization

    rng = np.random.default_rng(21)
    x = rng.standard_normal((700, 16)).astype(np.float32)
    q = rng.standard_normal((5, 16)).astype(np.float32)
    fit = quantization.int8_ranges([x]) if form == "int8" else quantization.binary_centers([x])
    decoder = None if form == "int8" else quantization.binary_decoder([x], fit)
    codes = quantization.encode(x, form, fit)
    weights = quantization.query_weights(form, fit, decoder)
    top, rows = topk.compressed_shortlist(
        jnp.asarray(q),
        padded(codes, 256),
        jnp.int32(x.shape[0]),
        jnp.asarray(weights),
        form=form,
        rows_out=40,
        block=256,
        group=8,
        coarse=4,
        candidates=40,
        screen_dtype="float32",
    )
    approx = q.astype(np.float64) @ quantization.decode(codes, form, fit, decoder).astype(np.float64).T
    expected = np.argsort(-approx, axis=1, kind="stable")[:, :40]
    for i in range(len(q)):
        # Equal as sets up to ties at the 40th score (binary codes repeat scores).
        cut = approx[i, expected[i, -1]]
        assert set(expected[i][approx[i, expected[i]] > cut + 1e-4]) <= set(np.asarray(rows[i]).tolist())
        assert np.all(approx[i, np.asarray(rows[i])] >= cut - 1e-4)
    assert np.all(np.diff(np.asarray(top), axis=1) <= 0), "scores best first"


def test_a_deep_binary_shortlist_is_the_best_rows():
    """A deep shortlist (4,000 rows of 262,144 random binary codes, the screen's default shape) is the 4,000 best
    rows by approximate score: every group that holds one is shortlisted, none dropped along the way."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (1 << 18, 16), dtype=np.uint8)
    q = rng.standard_normal((8, 128)).astype(np.float32)
    approx = q @ (np.unpackbits(codes, axis=1).astype(np.float32) * 2 - 1).T
    _, rows = topk.compressed_shortlist(
        jnp.asarray(q),
        jnp.asarray(codes),
        jnp.int32(codes.shape[0]),
        jnp.eye(128, dtype=jnp.float32),
        form="binary",
        rows_out=4000,
        candidates=4000,
        screen_dtype="float32",
    )
    best = np.argsort(-approx, axis=1, kind="stable")[:, :4000]
    for i, (b, r) in enumerate(zip(best, np.asarray(rows), strict=True)):
        cut = approx[i, b[-1]]  # up to ties at the last score
        assert set(b[approx[i, b] > cut + 1e-4].tolist()) <= set(r.tolist())
        assert np.all(approx[i, r] >= cut - 1e-4)
