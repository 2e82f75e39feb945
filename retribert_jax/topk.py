"""Exact top-k inner-product search over rows held on a device, at the speed of the matrix product.

The scores of Q queries against N rows are a [Q, N] matrix; choosing each query's k best from it with
`jax.lax.top_k` costs more than the product itself on a CPU (XLA's TopK is a partial sort, ~2.5 ns a score on one
thread, where faiss' heap pays a compare). `screened_topk` chooses without sorting the matrix:

1. **Screen.** The rows are scanned in blocks of `block` rows. Each block's scores [Q, block] are reduced to the
   best score of every fine group (`group` consecutive rows) and of every coarse group (`coarse` fine groups), and
   both are kept: elementwise maxima of whole vectors, no sort, one float per fine group and query. The screen may
   run in bfloat16 (twice the matmul rate on GPUs and TPUs): its error is bounded (`screen_bound`), and the bound is
   what keeps the result exact.
2. **Shortlist.** One top-k over the coarse bests ([Q, R / group / coarse]) takes the `candidates` best coarse
   groups, one over their fine groups' bests the `candidates` best fine groups. Any row whose exact score can reach
   the k-th best lies in a group whose screened best is at least `v_k - 2 e` (v_k: the k-th best shortlisted fine
   group, e: the screen's error bound for this query), since k groups reach v_k and each holds a row at least
   `v_k - e`.
3. **Rescore.** The shortlisted groups' rows are gathered and scored exactly in float32 (`Precision.HIGHEST`), in
   row order, and one top-k picks the k best: ties go to the lower row, as one top-k over all rows would give.

The result is exact when both shortlists held every group that reaches the bar, which is counted, and returned per
query. A query that fails is searched again with a shortlist as long as the count says (then exact), or by
`blocked_topk`, the plain blocked matmul + top-k, which is also the path for a k too large to screen for.

Keeping every fine group's best (R / group floats per query) rather than each slot's few best costs memory and saves
time: nothing needs ranking inside the scan (2^20 x 128 rows, 256 queries, a 2-core AVX2 CPU: 0.70 s against 0.85 s
for an insertion network keeping each slot's 6 best; the product alone, 0.46 s), and nothing is dropped, so a count
proves the result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
SCREEN_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The screen's shape: 4096-row blocks, 8-row fine groups, 16 fine groups to a coarse group.
SCREEN_BLOCK, SCREEN_GROUP, SCREEN_COARSE = 4096, 8, 16


def _gamma(dim: int) -> float:
    """Higham's gamma_D = D u / (1 - D u), u = 2^-24: the relative error bound of a float32 sum of D products."""
    return dim * 2.0**-24 / (1 - dim * 2.0**-24)


def screen_error(screen_dtype: str, dim: int) -> float:
    """The relative bound c with |screened score - rescored score| <= c * |q| * |x| for any query q and row x: the
    worst case of `screen_bound` (which `screened_topk` uses, from the index's own rounding residuals).

    Args:
      screen_dtype: "float32" or "bfloat16" (the operands' dtype; accumulation is float32 either way).
      dim: the vectors' width D.

    Both scores come from float32 sums of D products; each is within gamma_D * sum |q_i x_i| of the real inner
    product (Higham, "Accuracy and Stability of Numerical Algorithms", eq. 3.5, gamma_n = n u / (1 - n u), u the unit
    roundoff 2^-24), whatever the summation order. Rounding the operands to bfloat16 (unit roundoff 2^-8) moves each
    product by at most (2 u_bf16 + u_bf16^2) |q_i x_i|. Cauchy-Schwarz bounds sum |q_i x_i| by |q| |x|. The factor
    1 + 2^-10 covers the rounding of the bound's own float32 arithmetic. Assumes normal numbers (a flushed subnormal
    operand moves a product by less than 2^-126 times the other one).
    """
    gamma = _gamma(dim)
    if screen_dtype == "float32":
        c = 2 * gamma
    elif screen_dtype == "bfloat16":
        u = 2.0**-8
        c = 2 * u + u * u + gamma * (1 + u) ** 2 + gamma
    else:
        raise ValueError(f"screen_dtype must be one of {sorted(SCREEN_DTYPES)}, got {screen_dtype!r}")
    return c * (1 + 2.0**-10)


def screen_bound(queries: jax.Array, screen_dtype: str, norm: jax.Array, residual: jax.Array) -> jax.Array:
    """Each query's bound e with |screened score - rescored score| <= e for every row x of an index whose norms are
    at most `norm` and whose rounding residuals |x - screen(x)| are at most `residual` (`row_residual`).

    Args:
      queries: float32 [Q, D].
      screen_dtype: "float32" or "bfloat16".
      norm, residual: float32 scalars.

    Returns:
      float32 [Q].

    With q' the query rounded to the screen's dtype, dq = q - q' (exact in float32: the two are within a factor 2)
    and dx = screen(x) - x, the screen's exact sum q'.x' differs from q.x by q'.dx + dq.x, bounded by Cauchy-Schwarz
    by |q'| R + |dq| N; its float32 sum adds gamma_D |q'| (N + R), and the rescoring's gamma_D |q| N (Higham, eq.
    3.5; see `screen_error`). The factor 1 + 2^-10 covers the float32 arithmetic of the norms and of the bound.
    Rounding to bfloat16 moves a vector by ~u / 2 of its norm rather than the worst case u, and the query's share is
    measured rather than bounded: about half `screen_error`'s margin, so fewer groups pass the bar and fewer queries
    are searched again. A float32 screen has R = 0 and dq = 0: its bound is `screen_error`'s, 2 gamma_D |q| N.
    """
    dim = queries.shape[1]
    gamma = _gamma(dim)
    q_screen = queries.astype(SCREEN_DTYPES[screen_dtype]).astype(jnp.float32)
    q_norm = jnp.linalg.norm(queries, axis=1)
    qs_norm = jnp.linalg.norm(q_screen, axis=1)
    dq_norm = jnp.linalg.norm(queries - q_screen, axis=1)
    bound = qs_norm * residual + dq_norm * norm + gamma * (qs_norm * (norm + residual) + q_norm * norm)
    return bound * (1 + 2.0**-10)


def row_residual(rows: np.ndarray, screen_dtype: str, chunk: int = 65536) -> float:
    """The largest Euclidean norm of x - screen(x) over float rows [n, D] (each row rounded to the screen's dtype, to
    nearest with ties to even, as XLA converts), rounded up by 2^-20 relative: the `residual` of `screen_bound`. 0 for
    a float32 screen (or no rows); NaN rows, never hits, are skipped."""
    if screen_dtype == "float32" or rows.shape[0] == 0:
        return 0.0
    dtype = np.dtype(SCREEN_DTYPES[screen_dtype])
    worst = 0.0
    for a in range(0, rows.shape[0], chunk):
        x = np.asarray(rows[a : a + chunk], np.float32)
        r = x - x.astype(dtype).astype(np.float32)
        worst = max(worst, float(np.nanmax(np.sqrt(np.einsum("nd,nd->n", r, r, dtype=np.float64)), initial=0.0)))
    return worst * (1 + 2.0**-20)


def _masked_scores(scores: jax.Array, rows: jax.Array, n_valid: jax.Array) -> jax.Array:
    """-inf where a row is padding (at or past n_valid) or a score is NaN: such a row is never a hit (faiss' rule)."""
    return jnp.where((rows < n_valid) & ~jnp.isnan(scores), scores, -jnp.inf)


def _screen(score_block, blocks: jax.Array, n_valid: jax.Array, group: int, coarse: int):
    """Scans [NB, B, ...] blocks, `score_block(blk)` giving a block's scores [Q, B]; keeps every group's best score.

    A block's rows fall into B / group fine groups of `group` consecutive rows, and those into coarse groups of
    `coarse` fine groups taken at a stride (coarse group j of a block holds its fine groups j, j + C, j + 2C, ...;
    C = B / group / coarse), so that both maxima are elementwise maxima of whole vectors.

    Returns:
      fine bests [NB, Q, B / group] and coarse bests [Q, NB * C] (coarse group b * C + j: block b's j), float32;
      -inf for padding rows and NaN scores.
    """
    num_blocks, block = blocks.shape[:2]
    fine = block // group
    per_block = fine // coarse
    in_block = jnp.arange(block, dtype=jnp.int32)

    def step(_, xs):
        blk, b = xs
        scores = score_block(blk)  # Q B
        num_q = scores.shape[0]
        best = scores.reshape(num_q, fine, group).max(axis=-1)  # NaN where a group holds a NaN score
        # Masking every score costs a pass over them; only a block with padding or a NaN score needs it.
        masked = ((b + 1) * block > n_valid) | jnp.any(jnp.isnan(best))
        best = jax.lax.cond(
            masked,
            lambda: _masked_scores(scores, b * block + in_block, n_valid).reshape(num_q, fine, group).max(axis=-1),
            lambda: best,
        )
        return None, (best, best.reshape(num_q, coarse, per_block).max(axis=1))

    _, (fine_v, coarse_v) = jax.lax.scan(step, None, (blocks, jnp.arange(num_blocks, dtype=jnp.int32)))
    num_q = fine_v.shape[1]
    return fine_v, coarse_v.transpose(1, 0, 2).reshape(num_q, num_blocks * per_block)


def _shortlist(fine_v: jax.Array, coarse_v: jax.Array, candidates: int, group: int, coarse: int):
    """The `candidates` best coarse groups, and of their fine groups the `candidates` best.

    Returns:
      rows: [Q, c2 * group] int32, the shortlisted fine groups' rows in row order (a place never filled gives rows
        past any real one);
      short_v: [Q, c2], their bests, best first;
      short_g: [Q, c2], their fine group numbers in row order;
      seen_v: [Q, c1 * coarse], the bests of every fine group of the shortlisted coarse groups;
      (c1, c2): the shortlists' lengths (`candidates`, or fewer where there are fewer groups).
    """
    _, num_q, fine = fine_v.shape
    per_block = fine // coarse
    c1 = min(candidates, coarse_v.shape[1])
    _, coarse_id = jax.lax.top_k(coarse_v, c1)  # Q c1
    blk, j = coarse_id // per_block, coarse_id % per_block
    in_block = j[:, :, None] + per_block * jnp.arange(coarse, dtype=jnp.int32)  # Q c1 coarse
    seen_v = fine_v[blk[:, :, None], jnp.arange(num_q, dtype=jnp.int32)[:, None, None], in_block]
    seen_v = seen_v.reshape(num_q, c1 * coarse)
    seen_g = (blk[:, :, None] * fine + in_block).reshape(num_q, c1 * coarse)
    c2 = min(candidates, c1 * coarse)
    short_v, pos = jax.lax.top_k(seen_v, c2)
    short_g = jnp.take_along_axis(seen_g, pos, axis=1)
    # A shortlisted -inf is an empty place (padding), not a group: its rows are no candidates.
    short_g = jnp.sort(jnp.where(short_v > -jnp.inf, short_g, jnp.iinfo(jnp.int32).max // group), axis=1)
    rows = (short_g[:, :, None] * group + jnp.arange(group, dtype=jnp.int32)).reshape(num_q, c2 * group)
    return rows, short_v, short_g, seen_v, (c1, c2)


def _gather_groups(x: jax.Array, groups: jax.Array, group: int) -> jax.Array:
    """The rows [Q, C * group, W] of groups [Q, C] of `group` consecutive rows of x [R, W] (a group past the end
    gives the last one), gathered a group at a time: one contiguous slice per group, not one per row."""
    groups = jnp.minimum(groups, x.shape[0] // group - 1)
    return jnp.take(x.reshape(-1, group * x.shape[1]), groups, axis=0).reshape(groups.shape[0], -1, x.shape[1])


@functools.partial(jax.jit, static_argnames=("k", "block", "group", "coarse", "candidates", "screen_dtype"))
def screened_topk(
    queries: jax.Array,
    rows: jax.Array,
    n_valid: jax.Array,
    norm: jax.Array,
    residual: jax.Array,
    *,
    k: int,
    block: int = SCREEN_BLOCK,
    group: int = SCREEN_GROUP,
    coarse: int = SCREEN_COARSE,
    candidates: int = 256,
    screen_dtype: str = "float32",
):
    """Each query's exact top-k rows by inner product, screened as the module docstring says.

    Args:
      queries: float32 [Q, D].
      rows: [R, D] float32, float16 or bfloat16, R a multiple of `block`; rows at or past `n_valid` are padding.
      n_valid: int32 scalar, the number of real rows.
      norm: float32 scalar, at least the largest Euclidean norm of a real row (`row_norm`).
      residual: float32 scalar, at least the largest norm of a real row's rounding to the screen's dtype
        (`row_residual`; 0 for a float32 screen). With `norm`, it sets the screen's error bound (`screen_bound`).
      k: hits per query, at most `candidates` and at most R.
      block, group, coarse, candidates: the screen's shape (rows per block, rows per fine group, fine groups per
        coarse group, groups shortlisted at each level); `block` a multiple of `group * coarse`.
      screen_dtype: "float32" or "bfloat16".

    Returns:
      (scores float32 [Q, k], rows int32 [Q, k], exact bool [Q], needed int32 [Q]): hits in the total order (score
      descending, row ascending; -inf and row -1 where a query has fewer than k hits); whether each query's result
      is proven exact; a shortlist length that would prove it (`candidates` >= needed makes the result exact).
    """
    num_q, dim = queries.shape
    screen = SCREEN_DTYPES[screen_dtype]
    q_screen = queries.astype(screen)

    def score_block(blk):  # B D -> Q B
        return jnp.dot(q_screen, blk.astype(screen).T, precision=HIGHEST, preferred_element_type=jnp.float32)

    blocks = rows.reshape(rows.shape[0] // block, block, dim)  # NB B D
    fine_v, coarse_v = _screen(score_block, blocks, n_valid, group, coarse)
    cand_rows, short_v, short_g, seen_v, (c1, c2) = _shortlist(fine_v, coarse_v, candidates, group, coarse)

    # k groups reach the k-th shortlisted best, each with a row scored there: the k-th best row scores at least
    # that less e, and a row that can reach it is screened at least `bar` (-inf: fewer than k groups exist).
    error = screen_bound(queries, screen_dtype, norm, residual)  # Q
    kth = short_v[:, k - 1] if c2 >= k else jnp.full((num_q,), -jnp.inf)
    bar = kth - 2 * error  # Q

    def qualify(v):
        return jnp.sum((v >= bar[:, None]) & (v > -jnp.inf), axis=1)

    # Every qualifying row's coarse group qualifies, so with need_coarse <= c1 all of them were shortlisted, and
    # need_fine counts every qualifying fine group; else each qualifying coarse group holds at most `coarse`.
    need_coarse, need_fine = qualify(coarse_v), qualify(seen_v)
    exact = (need_coarse <= c1) & (need_fine <= c2) & ~jnp.isnan(bar)
    needed = jnp.where(need_coarse <= c1, need_fine, need_coarse * coarse)

    gathered = _gather_groups(rows, short_g, group).astype(jnp.float32)  # Q c2*G D
    scores = jnp.einsum("qd,qnd->qn", queries, gathered, precision=HIGHEST)  # Q c2*G
    top, where = jax.lax.top_k(_masked_scores(scores, cand_rows, n_valid), k)
    hit_rows = jnp.where(top > -jnp.inf, jnp.take_along_axis(cand_rows, where, axis=1), -1)
    return top, hit_rows, exact, needed


@functools.partial(
    jax.jit, static_argnames=("form", "rows_out", "block", "group", "coarse", "candidates", "screen_dtype")
)
def compressed_shortlist(
    queries: jax.Array,
    codes: jax.Array,
    n_valid: jax.Array,
    weights: jax.Array,
    *,
    form: str,
    rows_out: int,
    block: int = SCREEN_BLOCK,
    group: int = SCREEN_GROUP,
    coarse: int = SCREEN_COARSE,
    candidates: int = 256,
    screen_dtype: str = "bfloat16",
):
    """Each query's `rows_out` best rows by the approximate score of a compressed copy of the index: the rows worth
    rescoring (approximate by design, as sentence-transformers' `rescore_multiplier` shortlist is).

    The copy is screened as `screened_topk` screens float rows, for the `candidates` best groups of `group` rows;
    their rows' codes are then gathered and scored one by one, and the `rows_out` best kept. The `rows_out` best
    rows lie in at most `rows_out` groups, each at least as good as the last of them, so with
    `candidates >= rows_out` the result is the `rows_out` best rows by the approximate score (up to ties).

    Args:
      queries: float32 [Q, D].
      codes: int8 [R, D] ("int8": scalar-quantized, see `quantization`) or uint8 [R, D / 8] ("binary": sign bits,
        most significant bit first, as `numpy.packbits`); R a multiple of `block`; rows past `n_valid` are padding.
      weights: float32 [D, D]: the query's transform (`quantization.query_weights`: a query q scores a code as
        `(q @ weights.T) . code`).
      form: "int8" or "binary".
      rows_out: rows returned per query, at most `candidates * group` and at most R.
      block, group, coarse, candidates: the screen's shape, as `screened_topk`'s.
      screen_dtype: the matmul's operand dtype, "bfloat16" or "float32" (codes are exact in either; the query is
        rounded to it).

    Returns:
      (approximate scores float32 [Q, rows_out], rows int32 [Q, rows_out]), best first; -inf and row -1 where a
      query has fewer candidate rows.

    Scores are the query against the decoded rows (asymmetric: the query stays float): `(q @ weights.T) . code`,
    codes read as integers (int8) or +-1 (binary), ranks rows as `q . decode(code)` does (the rest is constant per
    query).
    """
    num_q, dim = queries.shape
    screen = SCREEN_DTYPES[screen_dtype]
    q_screen = jnp.dot(queries, weights.T, precision=HIGHEST).astype(screen)
    shifts = jnp.arange(7, -1, -1, dtype=jnp.uint8)

    def decoded(c):  # [..., width] codes -> [..., D] in the screen's dtype: integers, or +-1
        if form == "int8":
            return c.astype(screen)
        bits = (c[..., None] >> shifts) & 1  # ... D/8 8
        return (2 * bits.astype(screen) - 1).reshape(*c.shape[:-1], dim)

    def score_block(blk):  # B width -> Q B
        return jnp.dot(q_screen, decoded(blk).T, preferred_element_type=jnp.float32)

    blocks = codes.reshape(codes.shape[0] // block, block, codes.shape[1])
    fine_v, coarse_v = _screen(score_block, blocks, n_valid, group, coarse)
    cand_rows, _, short_g, _, _ = _shortlist(fine_v, coarse_v, candidates, group, coarse)
    gathered = _gather_groups(codes, short_g, group)  # Q c2*G width
    if form == "int8":
        scores = jnp.einsum("qnd,qd->qn", decoded(gathered), q_screen, preferred_element_type=jnp.float32)
    else:
        scores = _binary_scores(q_screen.astype(jnp.float32), gathered)
    top, where = jax.lax.top_k(_masked_scores(scores, cand_rows, n_valid), rows_out)
    return top, jnp.where(top > -jnp.inf, jnp.take_along_axis(cand_rows, where, axis=1), -1)


def _binary_scores(queries: jax.Array, codes: jax.Array) -> jax.Array:
    """Each query against its own rows' packed sign bits: queries float32 [Q, D], codes uint8 [Q, N, D / 8] ->
    float32 [Q, N], `q . b` with b the bits as +-1. By table lookup, as product quantization's asymmetric distance
    (Jegou et al., TPAMI 2011): each query's [D / 8, 256] table holds the score of every byte value at every byte
    position, and a row's score is the sum of its bytes' entries, a gather and a sum that fuse into one loop, where
    unpacking the bits would write 8 floats for every bit."""
    num_q, dim = queries.shape
    width = dim // 8
    shifts = jnp.arange(7, -1, -1, dtype=jnp.int32)
    signs = (2 * ((jnp.arange(256, dtype=jnp.int32)[:, None] >> shifts) & 1) - 1).astype(jnp.float32)  # 256 8
    table = jnp.einsum("qpj,vj->qpv", queries.reshape(num_q, width, 8), signs, precision=HIGHEST)  # Q D/8 256
    index = codes.astype(jnp.int32) + jnp.arange(width, dtype=jnp.int32) * 256  # Q N D/8
    return jnp.take_along_axis(table.reshape(num_q, 1, width * 256), index, axis=2).sum(axis=-1)


@functools.partial(jax.jit, static_argnames=("k", "block", "recall_target"))
def blocked_topk(
    queries: jax.Array,
    rows: jax.Array,
    n_valid: jax.Array,
    *,
    k: int,
    block: int = 65536,
    recall_target: float | None = None,
):
    """Each query's top-k rows by inner product, by a plain blocked float32 matmul + top-k merged across blocks.

    Args:
      queries: float32 [Q, D].
      rows: [R, D], R a multiple of `block`; rows at or past `n_valid` are padding.
      k: hits per query, any size up to R.
      recall_target: None for exact; else `jax.lax.approx_max_k`'s recall target (approximate on TPU only).

    Returns:
      (scores float32 [Q, k], rows int32 [Q, k]) in the total order; -inf and row -1 where there is no hit.
    """
    num_q, dim = queries.shape
    blocks = rows.reshape(rows.shape[0] // block, block, dim)  # NB B D
    per_block = min(k, block)

    def step(best, xs):
        blk, b = xs
        scores = jnp.einsum("qd,nd->qn", queries, blk.astype(jnp.float32), precision=HIGHEST)  # Q B
        scores = _masked_scores(scores, b * block + jnp.arange(block, dtype=jnp.int32), n_valid)
        if recall_target is None:
            top, idx = jax.lax.top_k(scores, per_block)  # ties: lower row first
        else:
            top, idx = jax.lax.approx_max_k(scores, per_block, recall_target=recall_target)
        # The running best (earlier rows) comes first and top_k is stable: lower rows win ties.
        s = jnp.concatenate([best[0], top], axis=1)
        r = jnp.concatenate([best[1], idx.astype(jnp.int32) + b * block], axis=1)
        top, pos = jax.lax.top_k(s, k)
        return (top, jnp.take_along_axis(r, pos, axis=1)), None

    init = (jnp.full((num_q, k), -jnp.inf, jnp.float32), jnp.full((num_q, k), -1, jnp.int32))
    (top, hit_rows), _ = jax.lax.scan(step, init, (blocks, jnp.arange(blocks.shape[0], dtype=jnp.int32)))
    return top, jnp.where(top > -jnp.inf, hit_rows, -1)


def row_norm(rows: np.ndarray) -> float:
    """The largest Euclidean norm of float rows [n, D] (0 for none; NaN rows, never hits, are skipped), rounded up
    by 2^-20 relative: the `norm` that `screened_topk` takes."""
    if rows.shape[0] == 0:
        return 0.0
    norms = np.sqrt(np.einsum("nd,nd->n", rows, rows, dtype=np.float64))
    return float(np.nanmax(norms, initial=0.0)) * (1 + 2.0**-20)


def merge_topk(scores: jax.Array, rows: jax.Array, k: int):
    """The k best of several hit lists laid side by side ([Q, n * k'], each list in the total order, lists in row
    order): one stable top-k keeps ties in row order. Returns (scores [Q, k], rows [Q, k])."""
    top, pos = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(rows, pos, axis=1)
