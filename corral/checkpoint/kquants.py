"""ggml's K-quant block formats (Q4_K, Q5_K, Q6_K), quantized as llama.cpp does without an importance matrix.

The block search is ggml's (``quantize_row_q{4,5,6}_K_ref`` in ggml-quants.c): for every sub-block a
small grid of candidate scales is tried and the one with the least weighted squared error kept,
then the sub-block scales are themselves quantized to 6 or 8 bits under one fp16 super-block scale.
To give the same bytes we do the same float32 operations in the same order: every sum over a
sub-block is accumulated element by element (numpy's ``sum`` over axis 0 of a C-ordered array adds
row after row), products are formed left to right, ``np.rint`` is ggml's ``nearest_int`` (round half
to even) and fp16 conversion is numpy's (round to nearest even). ggml-base is built without FMA
flags, so there is no fused multiply-add to imitate.

Sub-blocks are laid out as columns, ``(weights per sub-block, n sub-blocks)``, so each operation runs
over all sub-blocks at once. Super-blocks are 256 weights; block byte sizes are 144 (Q4_K), 176 (Q5_K)
and 210 (Q6_K).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_GROUP_MAX_EPS = np.float32(1e-15)
_F = np.float32


def _nearest(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int as float32 values: round half to even."""
    return np.rint(v)


def _columns(blocks: np.ndarray, width: int) -> np.ndarray:
    """(n, 256) super-blocks -> (width, n * 256 / width) sub-blocks as columns."""
    return np.ascontiguousarray(blocks.reshape(-1, width).T)


def _fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bits as uint16, the value read back as float32)."""
    h = v.astype(np.float16)
    return h.view(np.uint16), h.astype(np.float32)


# ---- Q4_K / Q5_K: asymmetric sub-blocks of 32 (scale and min), make_qkx2_quants -----------------


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of x (32, m): (scale, -min, levels 0..nmax as float32 (32, m)), ggml's make_qkx2_quants."""
    lo = np.minimum(x.min(axis=0), _F(0))
    hi = x.max(axis=0)
    flat = hi == lo
    sum_w = w.sum(axis=0)
    sum_x = (w * x).sum(axis=0)
    def levels_at(iscale, lo):
        return np.clip(_nearest(iscale * (x - lo)), 0, nmax)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _F(nmax) / (hi - lo)
        scale = _F(1) / iscale
        levels = levels_at(iscale, lo)
        diff = scale * levels + lo - x
        best = (w * (diff * diff)).sum(axis=0)
        # The winning levels are recomputed at the end from the (iscale, min) that made them: cheaper
        # than keeping a (32, m) copy up to date at every step, and the same float operations.
        best_iscale, best_lo = iscale, lo
        for step in range(nstep + 1):
            # ggml moves `min` to each better candidate's, so later steps search around it.
            iscale = (_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / (hi - lo)
            cand = levels_at(iscale, lo)
            wl = w * cand
            sum_l = wl.sum(axis=0)
            sum_l2 = (wl * cand).sum(axis=0)
            sum_xl = (wl * x).sum(axis=0)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, _F(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            diff = this_scale * cand + this_min - x
            err = (w * (diff * diff)).sum(axis=0)
            better = (det > 0) & (err < best)
            best_iscale = np.where(better, iscale, best_iscale)
            best_lo = np.where(better, lo, best_lo)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
        levels = levels_at(best_iscale, best_lo)
    levels[:, flat] = 0
    scale = np.where(flat, _F(0), scale)
    return scale, -lo, levels


def _as_u8_capped(v: np.ndarray, cap: int) -> np.ndarray:
    """uint8_t = nearest_int(v); MIN(cap, .) with C's wrap-around for negative ints."""
    return np.minimum(_nearest(v).astype(np.int64) & 0xFF, cap).astype(np.uint8)


def _scale_min_blocks(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The shared part of Q4_K and Q5_K: (d16, dmin16, packed scales (n, 12), levels (n, 256))."""
    n = x.shape[0]
    cols = _columns(x, 32)
    av = np.sqrt((cols * cols).sum(axis=0) / _F(32))
    weights = av + np.abs(cols)
    scales, mins, levels = _make_qkx2(cols, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = np.maximum(scales.max(axis=1), _F(0))
    max_min = np.maximum(mins.max(axis=1), _F(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F(63) / max_scale, _F(0))
        inv_min = np.where(max_min > 0, _F(63) / max_min, _F(0))
    ls = _as_u8_capped(inv_scale[:, None] * scales, 63)
    lm = _as_u8_capped(inv_min[:, None] * mins, 63)
    packed = np.empty((n, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d16, d = _fp16(max_scale / _F(63))
    dmin16, dmin = _fp16(max_min / _F(63))

    # Requantize every weight with the stored (rounded) scales; a zero scale keeps the search's levels.
    sub_d = (d[:, None] * ls.astype(np.float32)).reshape(-1)
    sub_m = (dmin[:, None] * lm.astype(np.float32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest((cols + sub_m) / sub_d), 0, nmax)
    levels = np.where(sub_d != 0, requant, levels)
    return d16, dmin16, packed, levels.T.reshape(n, QK_K).astype(np.uint8)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 144) uint8 Q4_K blocks: d, dmin, 12 scale bytes, 128 bytes of nibbles."""
    d16, dmin16, packed, q = _scale_min_blocks(x, 15, -1.0, 20)
    q = q.reshape(-1, 4, 2, 32)  # (block, 64-weight group, low/high half, 32)
    nibbles = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d16[:, None].view(np.uint8), dmin16[:, None].view(np.uint8), packed, nibbles], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 176) uint8 Q5_K blocks: d, dmin, 12 scale bytes, 32 high-bit bytes, 128 nibble bytes."""
    d16, dmin16, packed, q = _scale_min_blocks(x, 31, -0.5, 15)
    q = q.reshape(-1, 4, 2, 32)
    low = q & 0xF
    nibbles = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).astype(np.uint8)  # (block, group, half, 32); bit 2*group + half of qh[j]
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = np.bitwise_or.reduce((high << shifts[None, :, :, None]).reshape(-1, 8, 32), axis=1)
    return np.concatenate([d16[:, None].view(np.uint8), dmin16[:, None].view(np.uint8), packed, qh, nibbles],
                          axis=1)


# ---- Q6_K: symmetric sub-blocks of 16, int8 scales, make_qx_quants with rmse_type 1 ---------------


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column of x (16, m): (scale, levels 0..2*nmax-1 as float32), ggml's make_qx_quants(rmse_type=1)."""
    m = x.shape[1]
    pick = np.abs(x).argmax(axis=0)  # first index of the largest magnitude, as ggml's strict '>'
    peak = x[pick, np.arange(m)]
    zero = np.abs(peak) < _GROUP_MAX_EPS
    w = x * x
    wx = w * x

    def levels_at(iscale):
        return np.clip(_nearest(iscale * x), -nmax, nmax - 1)

    def trial(iscale):
        lv = levels_at(iscale)
        return (wx * lv).sum(axis=0), ((w * lv) * lv).sum(axis=0)

    with np.errstate(divide="ignore", invalid="ignore"):
        best_iscale = _F(-nmax) / peak
        sumlx, suml2 = trial(best_iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, _F(0))
        best = scale * sumlx
        for step in (*range(-9, 0), *range(1, 10)):
            iscale = -(_F(nmax) + _F(0.1) * _F(step)) / peak
            slx, sl2 = trial(iscale)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            best_iscale = np.where(better, iscale, best_iscale)  # its levels are recomputed once, below
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)
        levels = levels_at(best_iscale)
    levels = levels + nmax
    levels[:, zero] = 0
    return np.where(zero, _F(0), scale), levels


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 210) uint8 Q6_K blocks: 128 low-nibble bytes, 64 high-bit bytes, 16 int8 scales, d."""
    n = x.shape[0]
    cols = _columns(x, 16)
    scales, levels = _make_qx(cols, 32)
    scales = scales.reshape(n, 16)
    max_scale = scales[np.arange(n), np.abs(scales).argmax(axis=1)]
    empty = np.abs(max_scale) < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _F(-128) / max_scale
        d16, d = _fp16(_F(1) / iscale)
        sc = np.minimum(_nearest(iscale[:, None] * scales), 127)
        sc = np.where(empty[:, None], _F(0), sc)
        sub_d = (d[:, None] * sc).reshape(-1)
        requant = np.clip(_nearest(cols / sub_d), -32, 31) + 32
    levels = np.where(sub_d != 0, requant, levels).T.reshape(n, QK_K).astype(np.uint8)
    q = levels.reshape(n, 2, 4, 32)  # (block, 128-weight half, quarter, 32)
    low = q & 0xF
    ql = np.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2).reshape(n, 128)
    high = q >> 4
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    out = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d16[:, None].view(np.uint8)], axis=1)
    out[empty] = 0
    return out


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
