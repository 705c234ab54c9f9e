"""Row-wise log-sum-exp of scaled similarities, streamed over tiles (never the full logit matrix).

Legend: R = rows of this call (a rank's local features), C = columns (gathered features),
D = feature dim, K = per-row extra columns (a sample's own hard negatives), T = tile size.

``tiled_lse(rows_RD, cols_CD, scale)`` returns ``lse_R[i] = log sum_j exp(scale * rows_i . cols_j)``
(optionally over extra per-row columns, optionally excluding one column per row). The forward
merges per-tile log-sum-exps into a running value per row; the backward recomputes each tile,
so peak extra memory is O(T*T + (R + C)*D) instead of O(R*C). All arithmetic is in fp32 whatever
the input dtype (bf16 features under autocast stay exact to fp32 rounding).
"""

from __future__ import annotations

import torch


def _blocks(n: int, tile: int):
    for start in range(0, n, tile):
        yield start, min(start + tile, n)


def _tile_logits(rows_rD, cols_cD, scale, exclude_r, col_start):
    logits_rc = scale * (rows_rD @ cols_cD.T)
    if exclude_r is not None:
        # a mask, not a data-dependent index: no host sync on a GPU (rows whose column lies
        # outside this tile match nothing)
        cols_c = torch.arange(col_start, col_start + cols_cD.shape[0], device=logits_rc.device)
        logits_rc.masked_fill_(exclude_r[:, None] == cols_c[None, :], float("-inf"))
    return logits_rc


class _TiledLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_RD, cols_CD, scale, extra_RKD, exclude_R, tile):
        dtypes = (rows_RD.dtype, cols_CD.dtype, extra_RKD.dtype if extra_RKD is not None else None)
        work = torch.promote_types(rows_RD.dtype, torch.float32)
        rows, cols = rows_RD.to(work), cols_CD.to(work)
        extra = extra_RKD.to(work) if extra_RKD is not None else None
        s = scale.to(work)
        lse_R = torch.empty(rows.shape[0], dtype=work, device=rows.device)
        with torch.autocast(rows.device.type, enabled=False), torch.no_grad():
            for r0, r1 in _blocks(rows.shape[0], tile):
                ex = exclude_R[r0:r1] if exclude_R is not None else None
                lse = torch.full((r1 - r0,), float("-inf"), dtype=work, device=rows.device)
                parts = (_tile_logits(rows[r0:r1], cols[c0:c1], s, ex, c0) for c0, c1 in _blocks(cols.shape[0], tile))
                if extra is not None:
                    parts = [*parts, s * torch.einsum("rd,rkd->rk", rows[r0:r1], extra[r0:r1])]
                for logits in parts:
                    # fused per-tile log-sum-exp merged into the running value (stable at any scale)
                    lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
                lse_R[r0:r1] = lse
        ctx.save_for_backward(rows_RD, cols_CD, scale, extra_RKD, exclude_R, lse_R)
        ctx.tile, ctx.dtypes = tile, dtypes
        return lse_R

    @staticmethod
    def backward(ctx, grad_R):
        rows_RD, cols_CD, scale, extra_RKD, exclude_R, lse_R = ctx.saved_tensors
        work = lse_R.dtype
        rows, cols, s = rows_RD.to(work), cols_CD.to(work), scale.to(work)
        extra = extra_RKD.to(work) if extra_RKD is not None else None
        g_rows, g_cols = torch.zeros_like(rows), torch.zeros_like(cols)
        g_extra = torch.zeros_like(extra) if extra is not None else None
        g_scale = torch.zeros((), dtype=work, device=rows.device)
        grad_R = grad_R.to(work)
        with torch.autocast(rows.device.type, enabled=False):
            for r0, r1 in _blocks(rows.shape[0], ctx.tile):
                ex = exclude_R[r0:r1] if exclude_R is not None else None
                lse, g = lse_R[r0:r1, None], grad_R[r0:r1, None]
                for c0, c1 in _blocks(cols.shape[0], ctx.tile):
                    logits = _tile_logits(rows[r0:r1], cols[c0:c1], s, ex, c0)
                    p = logits.sub_(lse).exp_().mul_(g)  # d lse / d logit, times the incoming gradient
                    p_cols = p @ cols[c0:c1]
                    g_rows[r0:r1] += s * p_cols
                    g_cols[c0:c1] += s * (p.T @ rows[r0:r1])
                    g_scale += (rows[r0:r1] * p_cols).sum()
                if extra is not None:
                    dots = torch.einsum("rd,rkd->rk", rows[r0:r1], extra[r0:r1])
                    p = torch.exp(s * dots - lse) * g
                    g_rows[r0:r1] += s * torch.einsum("rk,rkd->rd", p, extra[r0:r1])
                    g_extra[r0:r1] = s * p[:, :, None] * rows[r0:r1, None, :]
                    g_scale += (p * dots).sum()
        d_rows, d_cols, d_extra = ctx.dtypes
        return (
            g_rows.to(d_rows),
            g_cols.to(d_cols),
            g_scale.to(scale.dtype).reshape(scale.shape),
            g_extra.to(d_extra) if g_extra is not None else None,
            None,
            None,
        )


def tiled_lse(rows_RD, cols_CD, scale, *, extra_RKD=None, exclude_R=None, tile: int = 1024) -> torch.Tensor:
    """``lse_R`` as in the module docstring, differentiable in rows, cols, scale and extra.

    Args:
        rows_RD, cols_CD: features; scale: scalar tensor (the multiplier).
        extra_RKD: K extra columns per row (e.g. a sample's own hard negatives), or None.
        exclude_R: a column index per row left out of the sum (decoupled contrastive loss), or None.
        tile: rows and columns per tile.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not torch.is_tensor(scale):
        scale = torch.tensor(
            float(scale), dtype=torch.promote_types(rows_RD.dtype, torch.float32), device=rows_RD.device
        )
    return _TiledLSE.apply(rows_RD, cols_CD, scale, extra_RKD, exclude_R, tile)


class _TiledLSEBoth(torch.autograd.Function):
    """Row and column log-sum-exp of one square N x N logit matrix in a single pass over tiles.

    One process's InfoNCE needs both directions of the same matrix (text->image logits are the
    transpose of image->text): sharing each tile halves the work of two separate passes.
    """

    @staticmethod
    def forward(ctx, rows_ND, cols_ND, scale, exclude_diag, tile):
        work = torch.promote_types(rows_ND.dtype, torch.float32)
        rows, cols, s = rows_ND.to(work), cols_ND.to(work), scale.to(work)
        n = rows.shape[0]
        diag = torch.arange(n, device=rows.device) if exclude_diag else None
        lse_r = torch.full((n,), float("-inf"), dtype=work, device=rows.device)
        lse_c = lse_r.clone()
        with torch.autocast(rows.device.type, enabled=False), torch.no_grad():
            for r0, r1 in _blocks(n, tile):
                ex = diag[r0:r1] if diag is not None else None
                for c0, c1 in _blocks(n, tile):
                    logits = _tile_logits(rows[r0:r1], cols[c0:c1], s, ex, c0)
                    # fused per-tile log-sum-exp, merged into the running values (stable)
                    lse_r[r0:r1] = torch.logaddexp(lse_r[r0:r1], torch.logsumexp(logits, dim=1))
                    lse_c[c0:c1] = torch.logaddexp(lse_c[c0:c1], torch.logsumexp(logits, dim=0))
        ctx.save_for_backward(rows_ND, cols_ND, scale, lse_r, lse_c)
        ctx.tile, ctx.exclude_diag = tile, exclude_diag
        return lse_r, lse_c

    @staticmethod
    def backward(ctx, g_r, g_c):
        rows_ND, cols_ND, scale, lse_r, lse_c = ctx.saved_tensors
        work = lse_r.dtype
        rows, cols, s = rows_ND.to(work), cols_ND.to(work), scale.to(work)
        n = rows.shape[0]
        diag = torch.arange(n, device=rows.device) if ctx.exclude_diag else None
        g_r = torch.zeros_like(lse_r) if g_r is None else g_r.to(work)
        g_c = torch.zeros_like(lse_c) if g_c is None else g_c.to(work)
        g_rows, g_cols = torch.zeros_like(rows), torch.zeros_like(cols)
        g_scale = torch.zeros((), dtype=work, device=rows.device)
        with torch.autocast(rows.device.type, enabled=False):
            for r0, r1 in _blocks(n, ctx.tile):
                ex = diag[r0:r1] if diag is not None else None
                for c0, c1 in _blocks(n, ctx.tile):
                    logits = _tile_logits(rows[r0:r1], cols[c0:c1], s, ex, c0)
                    p = torch.exp(logits - lse_r[r0:r1, None]).mul_(g_r[r0:r1, None])
                    p.add_(logits.sub_(lse_c[None, c0:c1]).exp_().mul_(g_c[None, c0:c1]))
                    p_cols = p @ cols[c0:c1]
                    g_rows[r0:r1] += s * p_cols
                    g_cols[c0:c1] += s * (p.T @ rows[r0:r1])
                    # d logit / d s = rows . cols, so sum(p * logits) / s = sum(rows * (p @ cols))
                    g_scale += (rows[r0:r1] * p_cols).sum()
        return (
            g_rows.to(rows_ND.dtype),
            g_cols.to(cols_ND.dtype),
            g_scale.to(scale.dtype).reshape(scale.shape),
            None,
            None,
        )


def tiled_lse_both(rows_ND, cols_ND, scale, *, exclude_diag: bool = False, tile: int = 1024):
    """``(lse over each row, lse over each column)`` of ``scale * rows @ cols.T`` (N x N), streamed."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not torch.is_tensor(scale):
        scale = torch.tensor(
            float(scale), dtype=torch.promote_types(rows_ND.dtype, torch.float32), device=rows_ND.device
        )
    return _TiledLSEBoth.apply(rows_ND, cols_ND, scale, exclude_diag, tile)
