"""Sketch construction for one weight matrix: low-bit codes plus per-row-group lookup tables.

A *sketch* of a weight ``W`` (out × in) is a code ``codes[r, c]`` in ``[0, 2**bits)`` for every
weight plus a small table per output row and column group:
``W_hat[r, c] = table[r, g(c), codes[r, c]]``. The ``groups_per_row`` (GPR) groups are contiguous
column ranges (:func:`group_index`). SketchTune (arXiv 2410.06364) fine-tunes the tables only;
the tables are built here the way LeanQuant (arXiv 2407.10032) builds its non-uniform grids.

Why each step (all pure torch; this file is the reference the fast paths are tested against):

* **Hessian, damping, inverse factor.** A linear layer's output error on calibration inputs
  ``X`` (tokens × in) is ``‖(W − W_hat) Xᵀ‖²  = tr(E H Eᵀ)`` with ``H = XᵀX`` and ``E = W − W_hat``
  (:func:`hessian_error`), so ``H`` is what the construction minimises against. We damp it with
  ``damp · mean(diag H)`` on the diagonal (LeanQuant recommends ``--percdamp 0.1``; GPTQ's default
  is 0.01), so a rank-deficient ``H`` (fewer tokens than inputs, dead inputs) stays invertible, and
  use the *upper Cholesky factor* ``U`` of ``H⁻¹`` (:func:`inverse_hessian_factor`): GPTQ's error
  feedback for column ``j`` is then one row of ``U`` and ``U[j, j]`` is that column's sensitivity.
* **Loss-error-aware tables (LeanQuant).** Quantising column ``j`` by ``δ`` costs about
  ``δ² / U[j, j]²`` in the loss, so columns with a small ``U[j, j]`` matter most and are the
  ones error feedback can least repair. The table values of a row group are therefore the
  centres of a weighted 1-D k-means over the group's weights with sample weights
  ``U[j, j]^(−p)`` (``exponent`` p). That keeps table entries near the outliers of ``H⁻¹``
  instead of spreading them over the bulk of the weights. LeanQuant recommends p = 3–4 for
  Llama-scale models; on SmolLM2-135M's own Hessians p = 2 gave a lower layer-wise output error
  than p = 4 (and than p = 0, plain k-means) at 2, 3 and 4 bits, on the calibration text and on
  held-out text alike, so 2 is the default here.
* **Fast exact 1-D k-means.** In one dimension the clusters of Lloyd's algorithm are intervals of
  the sorted values, so one sort per row plus prefix sums of ``w``, ``w·x``, ``w·x²`` make each
  iteration ``O(K log n)`` per row (a ``searchsorted`` of the ``K − 1`` mid-points), all rows at
  once. We start from two initialisations — weighted quantiles and an even grid from min to max
  (what LeanQuant's scikit-learn call uses for ``K ≤ 8``) — and keep, per row, the one with the
  lower weighted error.
* **GPTQ code assignment.** Columns are visited one at a time; each weight of the column takes
  its nearest table entry and the rounding error ``(w − q) / U[j, j]`` is propagated to the
  columns not yet visited through row ``j`` of ``U`` (lazily, in blocks of ``block_size``
  columns, as GPTQ does), vectorised over all rows.
* **Groups and column order.** Group ``g``'s table is fitted when the loop reaches that group, on
  the weights as error feedback has left them (GPTQ's non-static groups), and blocks restart at
  each group boundary so that those weights are fully up to date. With ``act_order`` the columns
  *inside each group* are visited by decreasing ``diag(H)`` (GPTQ's act-order restricted to the
  group, so groups stay contiguous in the stored layout); with one group per row this is plain
  act-order. Codes are returned in the original column order.
* **Tables in fp16.** Tables are stored as fp16, so they are rounded to fp16 *before* the codes
  are assigned: the error feedback then sees exactly the values the model will use.
"""
from __future__ import annotations

import torch

__all__ = [
    "group_index", "hessian_from_inputs", "inverse_hessian_factor", "weighted_kmeans_1d",
    "nearest_codes", "build_sketch", "sketch_weight", "round_to_nearest", "nearest_sketch",
    "hessian_error", "bits_per_weight",
]


def _check(bits: int, groups_per_row: int, in_features: int) -> None:
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if not 1 <= int(groups_per_row) <= in_features:
        raise ValueError(f"groups_per_row must be in 1..{in_features} (the row length), got {groups_per_row}")


def group_index(in_features: int, groups_per_row: int, device=None) -> torch.Tensor:
    """``g(c)`` for every column ``c``: ``(c · GPR) // in``, contiguous groups of (nearly) equal size.

    When ``GPR`` divides ``in`` every group has exactly ``in / GPR`` columns, which is
    SketchTune's layout ``[out, GPR, in / GPR]``.
    """
    return torch.arange(in_features, device=device) * groups_per_row // in_features  # (in,) int64


def _group_bounds(in_features: int, groups_per_row: int) -> list[tuple[int, int]]:
    starts = [-(-g * in_features // groups_per_row) for g in range(groups_per_row + 1)]  # ceil(g*in/G)
    return [(starts[g], starts[g + 1]) for g in range(groups_per_row)]


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` (in, in) in float64 from inputs ``(..., in)``; sums over every leading position."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return x.t() @ x


def inverse_hessian_factor(H: torch.Tensor, damp: float = 0.1) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, float64.

    If the damped matrix is still not positive definite (numerically), the damping is raised
    tenfold until it is, rather than failing a long construction on one layer.
    """
    H = H.to(torch.float64)
    n = H.shape[0]
    mean_diag = float(torch.diagonal(H).mean())
    lam = damp * mean_diag if mean_diag > 0 else 1.0
    eye = torch.eye(n, dtype=torch.float64, device=H.device)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        lam = lam * 10 if lam > 0 else 1e-6
    raise RuntimeError("the Hessian is not positive definite even after damping")


# ------------------------------------------------------------------------------- 1-D k-means


def _segment_sums(cum: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Sums over the intervals ``[edges[:, k], edges[:, k+1])`` from prefix sums ``cum`` (R, n+1)."""
    return cum.gather(1, edges[:, 1:]) - cum.gather(1, edges[:, :-1])


def _lloyd_sorted(xs, xs32, cw, cwx, cwxx, c, iters):
    """Weighted Lloyd iterations on sorted rows; returns (centroids (R, K), weighted SSE (R,)).

    Only rows whose centres still move are iterated (most converge in a few steps; the search
    over the sorted values is the cost). The interval search runs on a float32 copy of the
    values (exact mid-points in float32 of float32 values), the sums in float64.
    """
    n = xs.shape[1]

    def edges_for(cent, x32):
        mid = ((cent[:, :-1] + cent[:, 1:]) / 2).to(torch.float32)  # (R, K-1); ties go to the lower entry
        pos = torch.searchsorted(x32, mid.contiguous(), right=True)
        rows = cent.shape[0]
        zero = torch.zeros(rows, 1, dtype=torch.long, device=cent.device)
        return torch.cat([zero, pos, torch.full_like(zero, n)], dim=1)  # (R, K+1)

    c = c.clone()
    active = torch.arange(xs.shape[0], device=xs.device)
    for _ in range(iters):
        if active.numel() == 0:
            break
        ca = c[active]
        edges = edges_for(ca, xs32[active])
        cwa = cw[active]
        sw = _segment_sums(cwa, edges)
        swx = _segment_sums(cwx[active], edges)
        new = torch.where(sw > 0, swx / sw.clamp_min(1e-300), ca)  # an empty cluster keeps its centre
        moved = (new != ca).any(1)
        c[active] = new
        active = active[moved]
    edges = edges_for(c, xs32)
    sw, swx, swxx = (_segment_sums(t, edges) for t in (cw, cwx, cwxx))
    sse = (swxx - 2 * c * swx + c * c * sw).sum(1)  # (R,)
    return c, sse


def weighted_kmeans_1d(x: torch.Tensor, weights: torch.Tensor | None, k: int, iters: int = 100) -> torch.Tensor:
    """Weighted 1-D k-means of every row of ``x`` (R, n) into ``k`` sorted centres (R, k), float64.

    ``weights`` is (n,) shared by all rows, (R, n), or None (uniform). Lloyd's algorithm on the
    sorted values, from two initialisations (weighted quantiles and an even min–max grid); per
    row the lower weighted squared error wins. Rows with fewer distinct values than ``k`` get
    repeated centres (those codes are simply never used).
    """
    x = x.to(torch.float64)
    rows, n = x.shape
    if weights is None:
        w = torch.ones_like(x)
    else:
        w = weights.to(torch.float64, copy=False)
        w = w.expand(rows, n) if w.dim() == 1 else w
    xs, order = torch.sort(x, dim=1)
    xs32 = xs.to(torch.float32).contiguous()
    ws = w.gather(1, order)
    pad = torch.zeros(rows, 1, dtype=torch.float64, device=x.device)
    cw = torch.cat([pad, ws.cumsum(1)], 1)  # (R, n+1)
    cwx = torch.cat([pad, (ws * xs).cumsum(1)], 1)
    cwxx = torch.cat([pad, (ws * xs * xs).cumsum(1)], 1)

    # init 1: weighted quantiles at (i + 1/2) / k of the total weight
    total = cw[:, -1:]
    targets = (torch.arange(k, dtype=torch.float64, device=x.device) + 0.5) / k * total  # (R, k)
    qidx = torch.searchsorted(cw[:, 1:].contiguous(), targets.contiguous()).clamp_max(n - 1)
    c1, e1 = _lloyd_sorted(xs, xs32, cw, cwx, cwxx, xs.gather(1, qidx), iters)
    # init 2: an even grid from min to max
    frac = torch.linspace(0, 1, k, dtype=torch.float64, device=x.device)
    c2 = xs[:, :1] + (xs[:, -1:] - xs[:, :1]) * frac
    c2, e2 = _lloyd_sorted(xs, xs32, cw, cwx, cwxx, c2, iters)
    return torch.where((e2 < e1).unsqueeze(1), c2, c1)


def nearest_codes(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of each row's sorted ``table`` (R, K) for ``values`` (R, n), int64.

    Ties go to the lower entry.
    """
    mid = (table[:, :-1] + table[:, 1:]) / 2  # (R, K-1)
    return torch.searchsorted(mid.contiguous(), values.contiguous(), right=False)


def _round_table(table: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Round to the storage dtype (values stay float32) and keep each row sorted."""
    t = table.to(torch.float32)
    if dtype is not None:
        t = t.to(dtype).to(torch.float32)
    return torch.sort(t, dim=-1).values


# ------------------------------------------------------------------------------- construction


@torch.no_grad()
def build_sketch(W: torch.Tensor, H: torch.Tensor, bits: int, groups_per_row: int = 1, *, damp: float = 0.1,
                 exponent: float = 2.0, kmeans_iters: int = 100, block_size: int = 128, act_order: bool = True,
                 table_dtype: torch.dtype | None = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Sketch ``W`` (out, in) against the Hessian ``H = XᵀX`` (in, in) of its inputs.

    Returns ``codes`` (out, in) uint8, unpacked, in ``[0, 2**bits)``, and ``table``
    (out, GPR, 2**bits) float32 holding ``table_dtype``-representable values, each row sorted.
    ``W_hat = sketch_weight(codes, table)``. See the module docstring for why each step.
    Rows are independent given ``H``, so projections that share an input (q/k/v, gate/up) can
    be sketched in one call with their rows concatenated.
    """
    out_f, in_f = W.shape
    _check(bits, groups_per_row, in_f)
    if H.shape != (in_f, in_f):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({in_f}, {in_f})")
    K = 1 << bits
    device = W.device
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0

    bounds = _group_bounds(in_f, groups_per_row)
    perm_parts = []
    for s, e in bounds:
        cols = torch.arange(s, e, device=device)
        if act_order:
            cols = cols[torch.argsort(torch.diagonal(H)[s:e], descending=True, stable=True)]
        perm_parts.append(cols)
    perm = torch.cat(perm_parts)
    W = W[:, perm]
    H = H[perm][:, perm]

    U64 = inverse_hessian_factor(H, damp)  # (in, in) upper, permuted order
    d64 = torch.diagonal(U64).clone()
    sample_w = (d64 / d64.min()) ** (-float(exponent))  # (in,), max 1: U[j,j]^-p up to a constant
    U = U64.to(torch.float32)
    d = torch.diagonal(U).clone()

    table = torch.zeros(out_f, groups_per_row, K, dtype=torch.float32, device=device)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=device)
    for g, (s, e) in enumerate(bounds):
        tab = weighted_kmeans_1d(W[:, s:e], sample_w[s:e], K, kmeans_iters)  # (out, K), W[:, s:e] is up to date
        tab = _round_table(tab, table_dtype).to(device)
        table[:, g] = tab
        mid = ((tab[:, :-1] + tab[:, 1:]) / 2).contiguous()  # (out, K-1)
        for i1 in range(s, e, block_size):
            i2 = min(i1 + block_size, e)
            W1 = W[:, i1:i2].clone()  # (out, b)
            Err1 = torch.empty_like(W1)
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                w = W1[:, i]  # (out,)
                code = torch.searchsorted(mid, w.unsqueeze(1).contiguous(), right=False)  # (out, 1), nearest entry
                q = tab.gather(1, code).squeeze(1)
                codes[:, i1 + i] = code.squeeze(1).to(torch.uint8)
                err = (w - q) / d[i1 + i]
                W1[:, i:].sub_(err.unsqueeze(1) * U1[i, i:].unsqueeze(0))
                Err1[:, i] = err
            if i2 < in_f:
                W[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
    inv = torch.argsort(perm)
    return codes[:, inv].contiguous(), table


def sketch_weight(codes: torch.Tensor, table: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``W_hat[r, c] = table[r, g(c), codes[r, c]]`` (out, in) from unpacked codes."""
    out_f, in_f = codes.shape
    gpr, k = table.shape[1], table.shape[2]
    index = codes.long() + (group_index(in_f, gpr, codes.device) * k).unsqueeze(0)  # (out, in)
    return table.reshape(out_f, gpr * k).to(dtype).gather(1, index)


# ------------------------------------------------------------------------------- baselines


@torch.no_grad()
def round_to_nearest(W: torch.Tensor, bits: int, groups_per_row: int = 1,
                     table_dtype: torch.dtype | None = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """The round-to-nearest baseline in sketch form: a uniform min–max grid per row group.

    Returns (codes, table) like :func:`build_sketch`, so it dequantizes with the same
    :func:`sketch_weight`; the table is ``min + k · (max − min) / (2**bits − 1)``.
    """
    out_f, in_f = W.shape
    _check(bits, groups_per_row, in_f)
    K = 1 << bits
    W = W.detach().to(torch.float32)
    table = torch.zeros(out_f, groups_per_row, K, dtype=torch.float32, device=W.device)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
    frac = torch.linspace(0, 1, K, device=W.device)
    for g, (s, e) in enumerate(_group_bounds(in_f, groups_per_row)):
        lo, hi = W[:, s:e].amin(1, keepdim=True), W[:, s:e].amax(1, keepdim=True)
        tab = _round_table(lo + (hi - lo) * frac, table_dtype)
        table[:, g] = tab
        codes[:, s:e] = nearest_codes(W[:, s:e], tab).to(torch.uint8)
    return codes, table


@torch.no_grad()
def nearest_sketch(W: torch.Tensor, bits: int, groups_per_row: int = 1, weights: torch.Tensor | None = None,
                   kmeans_iters: int = 100, table_dtype: torch.dtype | None = torch.float16):
    """k-means tables (optionally weighted per column) and nearest-entry codes, no error feedback."""
    out_f, in_f = W.shape
    _check(bits, groups_per_row, in_f)
    K = 1 << bits
    W = W.detach().to(torch.float32)
    table = torch.zeros(out_f, groups_per_row, K, dtype=torch.float32, device=W.device)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
    for g, (s, e) in enumerate(_group_bounds(in_f, groups_per_row)):
        tab = _round_table(weighted_kmeans_1d(W[:, s:e], None if weights is None else weights[s:e], K,
                                              kmeans_iters), table_dtype)
        table[:, g] = tab
        codes[:, s:e] = nearest_codes(W[:, s:e], tab).to(torch.uint8)
    return codes, table


def hessian_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W − W_hat) H (W − W_hat)ᵀ)`` = ``‖(W − W_hat) Xᵀ‖²_F`` for ``H = XᵀX``, as a float."""
    E = (W.to(torch.float64) - W_hat.to(torch.float64))
    return float(((E @ H.to(torch.float64)) * E).sum())


def bits_per_weight(in_features: int, bits: int, groups_per_row: int, table_bits: int = 16) -> float:
    """Storage per weight: the code plus this row's share of its tables."""
    return bits + groups_per_row * (1 << bits) * table_bits / in_features

