"""The generic analog tiled MVM kernel behind the dense, MoE and on-the-fly-programming entry points.

One program computes a ``BLOCK_M x BLOCK_N`` block of outputs: ``BLOCK_M`` *slots* (rows of the
launch) by ``BLOCK_N`` output features. A slot holds an output row ``p`` (or a sentinel >= P, masked):
with ``GATHER`` off, ``p`` is the slot itself; with it on, ``p = sorted_ids[slot]`` (vLLM's
``sorted_token_ids``). From ``p``: the input row is ``p // X_DIV``, the noise row id is
``row_ids[p // RID_DIV]``, and with ``EXPERTS`` the weights/scales/seeds are those of
``expert_ids[program_id(0)]``.

For each input tile the program loops over the tile's inputs in ``BLOCK_K`` chunks: DAC (scale given per
(tile, input row) by the host, round half to even, clamp), input noise, ``tl.dot`` (fp32, IEEE), and the
IR-drop / PCM-read products as extra dot accumulators; then the epilogue: IR drop, weight and output
noise from Philox at the global element index, ADC, clamp, undo the input scale. Without bound
management (``ROUNDS`` off) the tile results times the digital scale are summed in registers and the
bias / routing weight / NaN rows applied before the store. With ``ROUNDS`` on, one launch is one
bound-management round: the program stores ``partial * out_scale`` per (tile, row, output) where the
host's pending mask is set, and ORs the clip flag per (tile, row, OUTPUT TILE) with ``atomic_max``; the
host derives the next pending mask (see ``run``).

``PROGRAM`` 1/2 generate the programmed weights inside the kernel from the digital weights (Gaussian /
PCM programming noise, see program.py) instead of loading programmed tile weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl

from romer_kernels.config.analog import MAX_BM_ROUNDS, IOConfig
from romer_kernels.config.tiling import TileGrid
from romer_kernels.kernels.triton._common import normal_at, quantize


def bm_limit_reached(reduction: float, io: IOConfig) -> bool:
    """aihwkit's stop rule, as ``reference._bm_limit_reached``."""
    step = io.inp_step
    return reduction > io.max_bm_factor or (step > 0 and reduction > io.max_bm_res / step)


def iterative(io: IOConfig) -> bool:
    return (not io.is_perfect) and io.bound_management == "iterative" and io.out_bound > 0


def bm_rounds(io: IOConfig) -> int:
    """How many bound-management rounds a forward can take (1 without iterative bound management)."""
    if not iterative(io):
        return 1
    for r in range(MAX_BM_ROUNDS):
        if bm_limit_reached(float(2 ** r), io):
            return r + 1
    return MAX_BM_ROUNDS


# ------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _absmax_kernel(x_ptr, stride_xm, amax_ptr, bad_ptr, toff_ptr, tsize_ptr, B, IN, T,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NEED_AMAX: tl.constexpr):
    """Per input row: non-finite flag; per (tile, row): abs-max of the tile's inputs (bad rows count as 0)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    nonfinite = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(0, IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (k < IN)[None, :]
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + k[None, :], mask=m, other=0.0)
        bad_x = (x != x) | (tl.abs(x) == float("inf"))
        nonfinite = tl.maximum(nonfinite, tl.max(bad_x.to(tl.int32), axis=1))
    tl.store(bad_ptr + rows, nonfinite.to(tl.int8), mask=rmask)
    if NEED_AMAX:
        for i in range(T):
            off = tl.load(toff_ptr + i)
            size = tl.load(tsize_ptr + i)
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, size, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                m = rmask[:, None] & (k < size)[None, :]
                x = tl.load(x_ptr + rows64[:, None] * stride_xm + (off + k)[None, :], mask=m, other=0.0)
                x = tl.where(nonfinite[:, None] > 0, 0.0, tl.abs(x))
                amax = tl.maximum(amax, tl.max(x, axis=1))
            tl.store(amax_ptr + i * B + rows64, amax, mask=rmask)


@triton.jit
def _tile_weight(w_base, stride_wt, stride_wo, stride_wk, i, off, k, kvalid, cols64, cvalid, IN, OUT,
                 wd_ptr, stride_wdo, stride_wdi, pa_ptr, pm_ptr, pseed0, pseed1, rd_ptr, rp_ptr, rs_ptr,
                 g_sigma, g_msig, g_max, c0, c1, c2, c3, p_ratio, p_scale, sigma_off,
                 PROGRAM: tl.constexpr, MAP_SCALE: tl.constexpr, G_ADD: tl.constexpr, G_MUL: tl.constexpr,
                 N_COEFF: tl.constexpr, P_RATIO: tl.constexpr, P_SCALE: tl.constexpr, PROG_NOISE: tl.constexpr,
                 READ: tl.constexpr, DRIFTS: tl.constexpr, READ_NOISE: tl.constexpr):
    """[BLOCK_K, BLOCK_N] tile weights (tile units) of input tile ``i``, zero outside the tile."""
    m = kvalid[:, None] & cvalid[None, :]
    if PROGRAM == 0:
        w = tl.load(w_base + i * stride_wt + cols64[None, :] * stride_wo + k[:, None] * stride_wk, mask=m, other=0.0)
    else:
        gk = (off + k).to(tl.int64)
        # the digital weights in their own dtype (a bfloat16 model is read as it is), computed in float32
        wd = tl.load(wd_ptr + cols64[None, :] * stride_wdo + gk[:, None] * stride_wdi, mask=m, other=0.0)
        wd = wd.to(tl.float32)
        if MAP_SCALE:   # target = w / weight-scaling s
            ms = tl.load(pm_ptr + i * OUT + cols64, mask=cvalid, other=1.0)
            t = tl.math.div_rn(wd, ms[None, :])
        else:
            t = wd
        e = cols64[None, :] * IN + gk[:, None]          # flat index r * in + c of the [out, in] weight
        pa = tl.load(pa_ptr + i * OUT + cols64, mask=cvalid, other=1.0)
        if PROGRAM == 1:   # Gaussian: t + sigma * w_max * xi1 + msig * |t| * xi2
            w = t
            if G_ADD:
                w = w + (pa * g_sigma)[None, :] * normal_at(pseed0, e)
            if G_MUL:
                w = w + (tl.abs(t) * g_msig) * normal_at(pseed1, e)
        else:              # PCM single pair, pa = conductance scale s of the tile
            s = pa[None, :]
            a = tl.minimum(tl.abs(t * s), g_max)
            plus = t >= 0.0
            if PROG_NOISE:
                xg = tl.math.div_rn(a, g_max)
                if N_COEFF == 1:
                    sig = xg * 0.0 + c0
                else:
                    sig = xg * c1 + c0
                    pw = xg
                    if N_COEFF >= 3:
                        pw = pw * xg
                        sig = sig + pw * c2
                    if N_COEFF >= 4:
                        pw = pw * xg
                        sig = sig + pw * c3
                if P_RATIO:
                    sig = sig * p_ratio
                if P_SCALE:
                    sig = sig * p_scale
                xi0 = normal_at(pseed0, e)
                xi1 = normal_at(pseed1, e)
                xi_on = tl.where(plus, xi0, xi1)
                xi_off = tl.where(plus, xi1, xi0)
                g_on = tl.maximum(sig * xi_on + a, 0.0)
                g_off = tl.maximum(xi_off * sigma_off, 0.0)
            else:
                g_on = a
                g_off = a * 0.0
            g_plus = tl.where(plus, g_on, g_off)
            g_minus = tl.where(plus, g_off, g_on)
            w = tl.math.div_rn(g_plus - g_minus, s)
            if READ == 2:  # PCM read at t: re-conversion with the programmed tile's scale, drift, 1/f noise
                w = _pcm_read(w, a, plus, e, i, cols64, cvalid, OUT, g_max, rd_ptr, rp_ptr, rs_ptr, DRIFTS, READ_NOISE)
        if READ == 1:      # Gaussian read: W_P + (read_sigma * w_max(W_P)) * xi
            rd = tl.load(rd_ptr + i * OUT + cols64, mask=cvalid, other=0.0)
            w = rd[None, :] * normal_at(tl.load(rs_ptr + 2), e) + w
        w = tl.where(m, w, 0.0)
    return w


@triton.jit
def _pcm_read(w, a, plus, e, i, cols64, cvalid, OUT, g_max, rd_ptr, rp_ptr, rs_ptr,
              DRIFTS: tl.constexpr, READ_NOISE: tl.constexpr):
    """noise/pcm.py ``read`` of programmed weights ``w`` (tile units) whose target's on-device conductance
    is ``a`` (G+ holds it where ``plus``): the drift exponents are drawn again from ``a`` and the DRIFT_NU
    streams, as the programming drew them. ``rd`` [T, out]: the re-conversion scale s' of the programmed
    tile; ``rp``: the fitted constants (see program.py READ_PARAMS); ``rs``: DRIFT_NU 0/1, READ 0/1 keys."""
    s2 = tl.load(rd_ptr + i * OUT + cols64, mask=cvalid, other=1.0)[None, :]
    g = tl.minimum(tl.abs(w * s2), g_max)
    on_plus = w >= 0.0                       # the device holding the programmed weight (the other is 0)
    gd = g
    if DRIFTS:
        xb = tl.maximum(tl.math.div_rn(a, g_max), 1e-7)
        lg = tl.log(xb)
        mu = tl.minimum(tl.maximum(lg * tl.load(rp_ptr + 0) + tl.load(rp_ptr + 1), tl.load(rp_ptr + 2)),
                        tl.load(rp_ptr + 3))
        sg = tl.minimum(tl.maximum(lg * tl.load(rp_ptr + 4) + tl.load(rp_ptr + 5), tl.load(rp_ptr + 6)),
                        tl.load(rp_ptr + 7))
        mu_off = tl.load(rp_ptr + 8)
        sg_off = tl.load(rp_ptr + 9)
        ds = tl.load(rp_ptr + 10)
        n0 = normal_at(tl.load(rs_ptr + 0), e)
        n1 = normal_at(tl.load(rs_ptr + 1), e)
        nu_on = tl.abs(sg * tl.where(plus, n0, n1) + mu) * ds
        nu_off = tl.abs(tl.where(plus, n1, n0) * sg_off + mu_off) * ds
        nu_plus = tl.where(plus, nu_on, nu_off)
        nu_minus = tl.where(plus, nu_off, nu_on)
        nu = tl.where(on_plus, nu_plus, nu_minus)
        gd = tl.exp(-nu * tl.load(rp_ptr + 11)) * g          # (t / t_0)^-nu, rp[11] = ln(t / t_0)
    if READ_NOISE:
        xq = tl.math.div_rn(g, g_max)
        # x^0.65; below 1e-30 it is far under the floor, as 0 would be (and ln stays finite)
        q = tl.exp(tl.load(rp_ptr + 12) * tl.log(tl.maximum(xq, 1e-30)))
        q = tl.minimum(tl.math.div_rn(1.0, tl.maximum(q, tl.load(rp_ptr + 13))) * tl.load(rp_ptr + 14),
                       tl.load(rp_ptr + 15))
        xi = tl.where(on_plus, normal_at(tl.load(rs_ptr + 2), e), normal_at(tl.load(rs_ptr + 3), e))
        gd = ((tl.abs(gd) * tl.load(rp_ptr + 16)) * (q * tl.load(rp_ptr + 17))) * xi + gd
    quotient = tl.math.div_rn(tl.maximum(gd, 0.0), s2)
    return tl.where(on_plus, quotient, -quotient)


@triton.jit
def _programmed_rowmax_kernel(amax_ptr, toff_ptr, tsize_ptr, IN, OUT,
                              wd_ptr, stride_wdo, stride_wdi, pa_ptr, pm_ptr, pseed0, pseed1,
                              g_sigma, g_msig, g_max, c0, c1, c2, c3, p_ratio, p_scale, sigma_off,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              PROGRAM: tl.constexpr, MAP_SCALE: tl.constexpr, G_ADD: tl.constexpr,
                              G_MUL: tl.constexpr, N_COEFF: tl.constexpr, P_RATIO: tl.constexpr,
                              P_SCALE: tl.constexpr, PROG_NOISE: tl.constexpr):
    """max |W_P| of every (input tile, output row) [T, out], W_P generated as the MVM kernel generates it:
    the crossbar-column abs-max of the programmed weights, for the read step's scales."""
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cvalid = cols < OUT
    cols64 = cols.to(tl.int64)
    off = tl.load(toff_ptr + i)
    size = tl.load(tsize_ptr + i)
    amax = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, size, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        w = _tile_weight(wd_ptr, 0, 0, 0, i, off, k, k < size, cols64, cvalid, IN, OUT,
                         wd_ptr, stride_wdo, stride_wdi, pa_ptr, pm_ptr, pseed0, pseed1, pa_ptr, pa_ptr, pa_ptr,
                         g_sigma, g_msig, g_max, c0, c1, c2, c3, p_ratio, p_scale, sigma_off,
                         PROGRAM, MAP_SCALE, G_ADD, G_MUL, N_COEFF, P_RATIO, P_SCALE, PROG_NOISE, 0, False, False)
        amax = tl.maximum(amax, tl.max(tl.abs(w), axis=0))
    tl.store(amax_ptr + i * OUT + cols64, amax, mask=cvalid)


@triton.jit
def _tile_output(x_ptr, stride_xm, xrow, rvalid, bad, insc, rid, i, off, size, ira,
                 w_base, stride_wt, stride_wo, stride_wk, cols64, cvalid,
                 s_inp, s_w, s_out, IN, OUT, T,
                 inp_step, inp_bound, inp_noise, out_step, out_bound, w_noise, out_noise, ir_drop,
                 wd_ptr, stride_wdo, stride_wdi, pa_ptr, pm_ptr, pseed0, pseed1, rd_ptr, rp_ptr, rs_ptr,
                 g_sigma, g_msig, g_max, c0, c1, c2, c3, p_ratio, p_scale, sigma_off,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PERFECT: tl.constexpr, INP_Q: tl.constexpr, OUT_Q: tl.constexpr, CLAMP: tl.constexpr,
                 NEG_TEST: tl.constexpr, INP_NOISE: tl.constexpr, W_NOISE: tl.constexpr, OUT_NOISE: tl.constexpr,
                 IR_DROP: tl.constexpr,
                 PROGRAM: tl.constexpr, MAP_SCALE: tl.constexpr, G_ADD: tl.constexpr, G_MUL: tl.constexpr,
                 N_COEFF: tl.constexpr, P_RATIO: tl.constexpr, P_SCALE: tl.constexpr, PROG_NOISE: tl.constexpr,
                 READ: tl.constexpr, DRIFTS: tl.constexpr, READ_NOISE: tl.constexpr):
    """(z / input_scale, clipped) of input tile ``i`` for the block: the reference's per-tile pipeline."""
    z = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    cur = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    wtd = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x2w = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    size_f = size.to(tl.float32)
    for k0 in range(0, size, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kvalid = k < size
        xm = rvalid[:, None] & kvalid[None, :]
        x = tl.load(x_ptr + xrow[:, None] * stride_xm + (off + k)[None, :], mask=xm, other=0.0)
        x = tl.where(bad[:, None], 0.0, x)
        w = _tile_weight(w_base, stride_wt, stride_wo, stride_wk, i, off, k, kvalid, cols64, cvalid, IN, OUT,
                         wd_ptr, stride_wdo, stride_wdi, pa_ptr, pm_ptr, pseed0, pseed1, rd_ptr, rp_ptr, rs_ptr,
                         g_sigma, g_msig, g_max, c0, c1, c2, c3, p_ratio, p_scale, sigma_off,
                         PROGRAM, MAP_SCALE, G_ADD, G_MUL, N_COEFF, P_RATIO, P_SCALE, PROG_NOISE, READ, DRIFTS, READ_NOISE)
        if PERFECT:
            xd = x
        else:
            xd = x * insc[:, None]
            if INP_Q:
                xd = quantize(xd, inp_step)
            xd = tl.minimum(tl.maximum(xd, -inp_bound), inp_bound)
            if INP_NOISE:
                e_in = rid[:, None] * IN + (off + k)[None, :]
                xd = xd + inp_noise * normal_at(s_inp, e_in)
            xd = tl.where(xm, xd, 0.0)
        z += tl.dot(xd, w, input_precision="ieee")
        if IR_DROP:
            cur += tl.dot(tl.abs(xd), tl.abs(w), input_precision="ieee")
            pos = 1.0 - tl.math.div_rn(k.to(tl.float32), size_f)
            wtd += tl.dot(xd * (1.0 - pos * pos)[None, :], w, input_precision="ieee")
        if W_NOISE == 1:
            sumsq += tl.sum(xd * xd, axis=1)
        if W_NOISE == 2:
            x2w += tl.dot(xd * xd, tl.abs(w), input_precision="ieee")
    over = z != z
    if not PERFECT:
        if IR_DROP:
            a = cur * ira
            c = a * (a * (0.05 * a - 0.2) + 0.5)
            z = z - c * ir_drop * wtd
        e_out = ((rid * T + i) * OUT)[:, None] + cols64[None, :]
        if W_NOISE == 1:
            z = z + (w_noise * tl.math.sqrt_rn(sumsq))[:, None] * normal_at(s_w, e_out)
        if W_NOISE == 2:
            z = z + (w_noise * tl.math.sqrt_rn(x2w)) * normal_at(s_w, e_out)
        if OUT_NOISE:
            z = z + out_noise * normal_at(s_out, e_out)
        if OUT_Q:
            z = quantize(z, out_step)
        if CLAMP:
            over = z > out_bound
            if NEG_TEST:
                over = over | (z < -out_bound)
            z = tl.minimum(tl.maximum(z, -out_bound), out_bound)
        z = tl.math.div_rn(z, insc[:, None])
    return z, over


@triton.jit
def _analog_mm_kernel(
    x_ptr, stride_xm, sid_ptr, S, eid_ptr, rid_ptr, bad_ptr, insc_ptr, BX,
    w_ptr, stride_we, stride_wt, stride_wo, stride_wk,
    osc_ptr, stride_oe, stride_ot,
    seed_ptr, stride_se,
    pend_ptr, flag_ptr, ot_ptr, NOT,
    part_ptr, y_ptr, stride_ym, bias_ptr, rw_ptr,
    toff_ptr, tsize_ptr, ira_ptr,
    P, IN, OUT, T, X_DIV, RID_DIV,
    inp_step, inp_bound, inp_noise, out_step, out_bound, w_noise, out_noise, ir_drop,
    wd_ptr, stride_wde, stride_wdo, stride_wdi, pa_ptr, pm_ptr, ps_ptr, rd_ptr, rp_ptr, rs_ptr,
    g_sigma, g_msig, g_max, c0, c1, c2, c3, p_ratio, p_scale, sigma_off,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PERFECT: tl.constexpr, INP_Q: tl.constexpr, OUT_Q: tl.constexpr, CLAMP: tl.constexpr, NEG_TEST: tl.constexpr,
    INP_NOISE: tl.constexpr, W_NOISE: tl.constexpr, OUT_NOISE: tl.constexpr, IR_DROP: tl.constexpr,
    ROUNDS: tl.constexpr, GATHER: tl.constexpr, EXPERTS: tl.constexpr, HAS_BIAS: tl.constexpr,
    MUL_RW: tl.constexpr,
    PROGRAM: tl.constexpr, MAP_SCALE: tl.constexpr, G_ADD: tl.constexpr, G_MUL: tl.constexpr,
    N_COEFF: tl.constexpr, P_RATIO: tl.constexpr, P_SCALE: tl.constexpr, PROG_NOISE: tl.constexpr,
                 READ: tl.constexpr, DRIFTS: tl.constexpr, READ_NOISE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if GATHER:
        p = tl.load(sid_ptr + slots, mask=slots < S, other=P).to(tl.int64)
    else:
        p = slots.to(tl.int64)
    rvalid = p < P
    p = tl.where(rvalid, p, 0)
    xrow = p // X_DIV
    rid = tl.load(rid_ptr + p // RID_DIV, mask=rvalid, other=0).to(tl.int64)
    bad = tl.load(bad_ptr + xrow, mask=rvalid, other=0) != 0
    if EXPERTS:
        ex = tl.load(eid_ptr + pid_m).to(tl.int64)
    else:
        ex = pid_m.to(tl.int64) * 0
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cvalid = cols < OUT
    cols64 = cols.to(tl.int64)
    s_inp = tl.load(seed_ptr + ex * stride_se + 0)
    s_w = tl.load(seed_ptr + ex * stride_se + 1)
    s_out = tl.load(seed_ptr + ex * stride_se + 2)
    w_base = w_ptr + ex * stride_we
    osc_base = osc_ptr + ex * stride_oe
    # on-the-fly chips: this expert's digital weights, per-column vectors and stream keys
    wd_e = wd_ptr + ex * stride_wde
    pa_e = pa_ptr + ex * T * OUT
    pm_e = pm_ptr + ex * T * OUT
    rd_e = rd_ptr + ex * T * OUT
    rs_e = rs_ptr + ex * 4
    if PROGRAM == 0:
        pseed0 = ex * 0
        pseed1 = ex * 0
    else:
        pseed0 = tl.load(ps_ptr + ex * 2)
        pseed1 = tl.load(ps_ptr + ex * 2 + 1)
    if ROUNDS:
        ot = tl.load(ot_ptr + cols, mask=cvalid, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(T):
        off = tl.load(toff_ptr + i)
        size = tl.load(tsize_ptr + i)
        ira = tl.load(ira_ptr + i)
        if PERFECT:
            insc = tl.full([BLOCK_M], 1.0, tl.float32)
            alive = rvalid
        else:
            insc = tl.load(insc_ptr + i * BX + xrow, mask=rvalid, other=0.0)
            alive = insc > 0.0
            insc = tl.where(alive, insc, 1.0)
        osc = tl.load(osc_base + i * stride_ot + cols64, mask=cvalid, other=0.0)
        active = True  # static: every block computes its tile in the single-pass kernel
        if ROUNDS:  # bound-management rounds: only blocks holding a pending (tile, row) pair
            pm = rvalid[:, None] & cvalid[None, :]
            row_base = (i * P + p) * NOT
            pend = tl.load(pend_ptr + row_base[:, None] + ot[None, :], mask=pm, other=0) != 0
            active = tl.sum(pend.to(tl.int32)) > 0
        if active:
            z, over = _tile_output(
                x_ptr, stride_xm, xrow, rvalid, bad, insc, rid, i, off, size, ira,
                w_base, stride_wt, stride_wo, stride_wk, cols64, cvalid, s_inp, s_w, s_out, IN, OUT, T,
                inp_step, inp_bound, inp_noise, out_step, out_bound, w_noise, out_noise, ir_drop,
                wd_e, stride_wdo, stride_wdi, pa_e, pm_e, pseed0, pseed1, rd_e, rp_ptr, rs_e,
                g_sigma, g_msig, g_max, c0, c1, c2, c3, p_ratio, p_scale, sigma_off,
                BLOCK_M, BLOCK_N, BLOCK_K, PERFECT, INP_Q, OUT_Q, CLAMP, NEG_TEST, INP_NOISE, W_NOISE,
                OUT_NOISE, IR_DROP, PROGRAM, MAP_SCALE, G_ADD, G_MUL, N_COEFF, P_RATIO, P_SCALE, PROG_NOISE, READ, DRIFTS, READ_NOISE)
            if ROUNDS:
                out_base = (i * P + p) * OUT
                tl.store(part_ptr + out_base[:, None] + cols64[None, :], z * osc[None, :], mask=pend)
                tl.atomic_max(flag_ptr + row_base[:, None] + ot[None, :], over.to(tl.int32), mask=pend & over)
            else:
                acc += tl.where(alive[:, None], z, 0.0) * osc[None, :]
    if not ROUNDS:
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + cols64, mask=cvalid, other=0.0)[None, :]
        if MUL_RW:
            acc = acc * tl.load(rw_ptr + p, mask=rvalid, other=0.0)[:, None]
        acc = tl.where(bad[:, None], float("nan"), acc)
        tl.store(y_ptr + p[:, None] * stride_ym + cols64[None, :], acc, mask=rvalid[:, None] & cvalid[None, :])


# ------------------------------------------------------------------------------------------------------
# host driver
# ------------------------------------------------------------------------------------------------------
@dataclass
class Program:
    """On-the-fly programming of the tile weights (see program.py): ``mode`` 1 Gaussian, 2 PCM."""

    mode: int
    weight: torch.Tensor            # digital weight [out, in]
    pa: torch.Tensor                # [T, out]: Gaussian column w_max / PCM conductance scale
    map_scale: torch.Tensor | None  # [T, out] weight-scaling s (target = w / s), None: s = 1
    seed0: int = 0                  # PROGRAM slot 0
    seed1: int = 0                  # Gaussian: MULTIPLICATIVE slot 0; PCM: PROGRAM slot 1
    g_sigma: float = 0.0
    g_msig: float = 0.0
    g_max: float = 1.0
    coeffs: tuple[float, ...] = (0.0,)
    p_ratio: float = 1.0
    p_scale: float = 1.0
    sigma_off: float = 0.0
    # the read step (drift and read noise at t), after programming: 0 none, 1 Gaussian, 2 PCM
    read: int = 0
    read_scale: torch.Tensor | None = None   # [T, out]: PCM re-conversion scale s' / Gaussian read_sigma * w_max
    read_params: torch.Tensor | None = None  # float32 constants of the PCM read (program.py READ_PARAMS order)
    read_seeds: torch.Tensor | None = None   # int64 [4]: DRIFT_NU slot 0/1, READ slot 0/1 (Gaussian: READ in [2])
    drifts: bool = False
    read_noise: bool = False
    # grouped experts: ``weight`` [E, out, in], every [T, out] tensor stacked to [E, T, out], read_seeds
    # [E, 4], and the programming keys per expert here (int64 [E, 2]: seed0, seed1)
    seed_table: torch.Tensor | None = None


@dataclass
class Blocks:
    m: int = 32
    n: int = 64
    k: int = 32
    prepass_m: int = 32
    prepass_k: int = 64


def _dummy(device, dtype):
    return torch.zeros(1, device=device, dtype=dtype)


def tile_meta(grid: TileGrid, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first input column, input size) of every input tile, int32 on ``device``."""
    sizes = grid.in_sizes
    offsets = [0]
    for s in sizes[:-1]:
        offsets.append(offsets[-1] + s)
    return (torch.tensor(offsets, dtype=torch.int32, device=device),
            torch.tensor(sizes, dtype=torch.int32, device=device))


def input_scales(x: torch.Tensor, grid: TileGrid, io: IOConfig, blocks: Blocks, toff, tsize):
    """Pre-pass: (non-finite row flags int8 [B], noise-management scale [T, B] fp32 as the reference)."""
    batch = x.shape[0]
    n_tiles = len(grid.in_sizes)
    amax = torch.zeros(n_tiles, batch, dtype=torch.float32, device=x.device)
    bad = torch.zeros(batch, dtype=torch.int8, device=x.device)
    need_amax = (not io.is_perfect) and io.noise_management == "abs_max"
    if batch:
        _absmax_kernel[(triton.cdiv(batch, blocks.prepass_m),)](
            x, x.stride(0), amax, bad, toff, tsize, batch, x.shape[1], n_tiles,
            BLOCK_M=blocks.prepass_m, BLOCK_K=blocks.prepass_k, NEED_AMAX=need_amax)
    if io.noise_management == "abs_max":
        nm = amax.clamp_max(io.nm_thres) if io.nm_thres > 0 else amax
    elif io.noise_management == "constant":
        nm = torch.full_like(amax, io.nm_thres if io.nm_thres > 0 else 1.0)
    else:
        nm = torch.ones_like(amax)
    return bad, nm


def run(
    x: torch.Tensor,
    w_split: torch.Tensor,
    out_scale: torch.Tensor,
    grid: TileGrid,
    io: IOConfig,
    seeds: Callable[[int], torch.Tensor] | None,
    row_ids: torch.Tensor,
    *,
    n_out_rows: int | None = None,
    sorted_ids: torch.Tensor | None = None,
    expert_ids: torch.Tensor | None = None,
    x_div: int = 1,
    rid_div: int = 1,
    bias: torch.Tensor | None = None,
    routing_weights: torch.Tensor | None = None,
    program: Program | None = None,
    blocks: Blocks = Blocks(),
    partial: bool = False,
) -> torch.Tensor:
    """Analog MVM of ``x`` [BX, in] (fp32, contiguous) -> [P, out] (see the module docstring); with
    ``partial`` the per-input-tile outputs times ``out_scale`` [T, P, out] instead (the drift-compensation
    readout), before bias and NaN rows.

    ``w_split`` [E, T, out, n_max] tile weights (ignored with ``program``), ``out_scale`` [E, T, out],
    ``seeds(r)`` an int64 tensor [E, 3] (INP_NOISE, W_NOISE, OUT_NOISE keys of round r) on x's device
    or None (no per-MVM noise), ``row_ids`` int64 noise row ids indexed by ``p // rid_div``.
    """
    device = x.device
    batch_x, in_features = x.shape
    out_features = out_scale.shape[-1]
    n_tiles = len(grid.in_sizes)
    n_rows = batch_x if n_out_rows is None else n_out_rows
    out_sizes = grid.out_sizes
    toff, tsize = tile_meta(grid, device)
    ira = (torch.tensor(grid.in_sizes, dtype=torch.float32) / io.ir_drop_g_ratio).to(device)
    bad, nm = input_scales(x, grid, io, blocks, toff, tsize)
    dead = (nm <= 0) if (io.noise_management != "none" and io.inp_noise <= 0) else torch.zeros_like(nm, dtype=torch.bool)
    safe = torch.where(nm > 0, nm, torch.ones_like(nm))

    gather = sorted_ids is not None
    n_slots = sorted_ids.numel() if gather else n_rows
    y = torch.zeros(n_rows, out_features, dtype=torch.float32, device=device)
    if n_slots == 0 or n_rows == 0:
        return torch.zeros(n_tiles, n_rows, out_features, dtype=torch.float32, device=device) if partial else y
    grid_launch = (triton.cdiv(n_slots, blocks.m), triton.cdiv(out_features, blocks.n))
    rounds_mode = iterative(io) or partial  # the rounds path stores per-tile outputs
    noisy = seeds is not None
    perfect = io.is_perfect
    f32, i8, i32, i64 = torch.float32, torch.int8, torch.int32, torch.int64
    pr = program
    consts = dict(
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        PERFECT=perfect, INP_Q=io.inp_step > 0, OUT_Q=io.out_step > 0, CLAMP=io.out_bound > 0,
        NEG_TEST=io.bm_test_negative_bound,
        INP_NOISE=noisy and io.inp_noise > 0,
        W_NOISE=(0 if not (noisy and io.w_noise > 0) else (1 if io.w_noise_type == "additive_constant" else 2)),
        OUT_NOISE=noisy and io.out_noise > 0, IR_DROP=io.ir_drop > 0,
        ROUNDS=rounds_mode, GATHER=gather, EXPERTS=expert_ids is not None, HAS_BIAS=bias is not None,
        MUL_RW=routing_weights is not None,
        PROGRAM=0 if pr is None else pr.mode,
        MAP_SCALE=pr is not None and pr.map_scale is not None,
        G_ADD=pr is not None and pr.mode == 1 and pr.g_sigma > 0,
        G_MUL=pr is not None and pr.mode == 1 and pr.g_msig > 0,
        N_COEFF=1 if pr is None else len(pr.coeffs),
        P_RATIO=pr is not None and pr.p_ratio != 1.0,
        P_SCALE=pr is not None and pr.p_scale != 1.0,
        PROG_NOISE=pr is not None and pr.mode == 2 and pr.p_scale != 0.0,
        READ=0 if pr is None else pr.read,
        DRIFTS=pr is not None and pr.drifts,
        READ_NOISE=pr is not None and pr.read_noise,
    )
    if consts["N_COEFF"] > 4:
        raise NotImplementedError("on-the-fly PCM programming supports polynomials of at most 4 coefficients")
    coeffs = (list(pr.coeffs) if pr is not None else []) + [0.0] * 4
    read_args = ((pr.read_scale, pr.read_params, pr.read_seeds) if pr is not None and pr.read
                 else (_dummy(device, f32), _dummy(device, f32), _dummy(device, i64)))
    if pr is None:
        wd, pa, pm = _dummy(device, f32), _dummy(device, f32), _dummy(device, f32)
        wd_strides = (0, 0, 0)
        program_seeds = _dummy(device, i64)
        w_args = (w_split, w_split.stride(0), w_split.stride(1), w_split.stride(2), w_split.stride(3))
    else:
        wd, pa = pr.weight, pr.pa
        pm = pr.map_scale if pr.map_scale is not None else _dummy(device, f32)
        wd_strides = (wd.stride(0) if wd.dim() == 3 else 0, wd.stride(-2), wd.stride(-1))
        program_seeds = (pr.seed_table if pr.seed_table is not None
                         else torch.tensor([[pr.seed0, pr.seed1]], dtype=i64, device=device)).contiguous()
        w_args = (_dummy(device, f32), 0, 0, 0, 0)
    out_tile = torch.repeat_interleave(torch.arange(len(out_sizes), dtype=i32), torch.tensor(out_sizes)).to(device)
    n_out_tiles = len(out_sizes)
    zero_seeds = torch.zeros(1, 3, dtype=i64, device=device)

    def launch(bm_round: int, insc, pend, flags, part):
        seed_t = seeds(bm_round) if noisy else zero_seeds
        _analog_mm_kernel[grid_launch](
            x, x.stride(0), sorted_ids if gather else _dummy(device, i32), n_slots,
            expert_ids if expert_ids is not None else _dummy(device, i32), row_ids, bad, insc, batch_x,
            *w_args, out_scale, out_scale.stride(0), out_scale.stride(1), seed_t, seed_t.stride(0),
            pend, flags, out_tile, n_out_tiles, part, y, y.stride(0),
            bias if bias is not None else _dummy(device, f32),
            routing_weights if routing_weights is not None else _dummy(device, f32),
            toff, tsize, ira, n_rows, in_features, out_features, n_tiles, x_div, rid_div,
            io.inp_step, io.inp_bound, io.inp_noise, io.out_step, io.out_bound, io.w_noise, io.out_noise, io.ir_drop,
            wd, *wd_strides, pa, pm, program_seeds, *read_args,
            pr.g_sigma if pr else 0.0, pr.g_msig if pr else 0.0, pr.g_max if pr else 1.0,
            float(coeffs[0]), float(coeffs[1]), float(coeffs[2]), float(coeffs[3]),
            pr.p_ratio if pr else 1.0, pr.p_scale if pr else 1.0, pr.sigma_off if pr else 0.0,
            **consts, num_warps=4, enable_fp_fusion=False)

    def scale_of_round(bm_round: int) -> torch.Tensor:
        insc = (1.0 / safe) / float(2 ** bm_round)
        return torch.where(dead, torch.zeros_like(insc), insc).contiguous()

    if not rounds_mode:
        launch(0, scale_of_round(0), _dummy(device, i8), _dummy(device, i32), _dummy(device, f32))
        return y

    part = torch.zeros(n_tiles, n_rows, out_features, dtype=f32, device=device)
    alive_rows = ~dead[:, torch.arange(n_rows, device=device) // x_div]          # [T, P]
    pending = alive_rows[:, :, None].expand(n_tiles, n_rows, n_out_tiles).to(i8).contiguous()
    for bm_round in range(MAX_BM_ROUNDS):
        flags = torch.zeros(n_tiles, n_rows, n_out_tiles, dtype=i32, device=device)
        launch(bm_round, scale_of_round(bm_round), pending, flags, part)
        if not iterative(io) or bm_limit_reached(float(2 ** bm_round), io):
            break
        pending = (pending.bool() & (flags > 0)).to(i8)
        if not bool(pending.any()):
            break
    if partial:
        return part
    y = part.sum(dim=0)
    if bias is not None:
        y = y + bias
    if routing_weights is not None:
        y = y * routing_weights[:, None]
    bad_out = bad[torch.arange(n_rows, device=device) // x_div].bool()
    return y.masked_fill(bad_out[:, None], float("nan"))



def programmed_rowmax(program: "Program", grid: TileGrid, blocks: Blocks = Blocks()) -> torch.Tensor:
    """max |W_P| per (input tile, output row) [T, out] of an on-the-fly programmed chip (no read step)."""
    device = program.weight.device
    out_features, in_features = program.weight.shape
    toff, tsize = tile_meta(grid, device)
    amax = torch.zeros(len(grid.in_sizes), out_features, dtype=torch.float32, device=device)
    pr = program
    coeffs = list(pr.coeffs) + [0.0] * 4
    pm = pr.map_scale if pr.map_scale is not None else _dummy(device, torch.float32)
    _programmed_rowmax_kernel[(len(grid.in_sizes), triton.cdiv(out_features, blocks.n))](
        amax, toff, tsize, in_features, out_features,
        pr.weight, pr.weight.stride(0), pr.weight.stride(-1), pr.pa, pm, pr.seed0, pr.seed1,
        pr.g_sigma, pr.g_msig, pr.g_max, float(coeffs[0]), float(coeffs[1]), float(coeffs[2]), float(coeffs[3]),
        pr.p_ratio, pr.p_scale, pr.sigma_off,
        BLOCK_N=blocks.n, BLOCK_K=blocks.k, PROGRAM=pr.mode, MAP_SCALE=pr.map_scale is not None,
        G_ADD=pr.mode == 1 and pr.g_sigma > 0, G_MUL=pr.mode == 1 and pr.g_msig > 0, N_COEFF=len(pr.coeffs),
        P_RATIO=pr.p_ratio != 1.0, P_SCALE=pr.p_scale != 1.0, PROG_NOISE=pr.mode == 2 and pr.p_scale != 0.0,
        num_warps=4, enable_fp_fusion=False)
    return amax
