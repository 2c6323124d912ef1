"""Triton kernels of the unfused backend: one kernel per pre-amble stage, as an engine runs them today.

Seven launches per call: add+RMSNorm+quant, router GEMM, grouped top-k, moe_align, gate_up GEMM,
SiLU-and-mul+quant, down GEMM. They are written for M <= a few hundred tokens (decode): the GEMMs are
"skinny" (all M rows of the activations in one program, CUDA-core FMAs on up-converted weights; the
weights are streamed once, which is what bounds the time at this M).

Importing this module needs triton; ``unfused.py`` only imports it on CUDA devices (or under
TRITON_INTERPRET=1 for CPU tests of the kernels themselves).
"""
from __future__ import annotations

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)
QUANT_EPS = tl.constexpr(1e-10)


# FP8 group quantization as vLLM's CUDA kernel (per_token_group_quant_8bit) does it with fmaxf / fminf, which
# drop NaNs: the group's amax skips NaN values, and a NaN quotient clamps to -448 (tl.clamp gave +448).
@triton.jit
def _abs_not_nan(x):
    return tl.where(x != x, 0.0, tl.abs(x))


@triton.jit
def _clamp_fp8(q):
    return tl.where(q != q, -FP8_MAX, tl.clamp(q, -FP8_MAX, FP8_MAX))


@triton.jit
def add_rmsnorm_quant_kernel(hidden_ptr, residual_ptr, norm_w_ptr, res_out_ptr, x_out_ptr, q_ptr, s_ptr,
                             eps, H: tl.constexpr, NG: tl.constexpr, NG_P2: tl.constexpr, GROUP: tl.constexpr):
    """One program per token: residual = bf16(hidden + residual); x = bf16(bf16(residual * rstd) * w);
    a_q / a_scale = per-128-group FP8 of x."""
    m = tl.program_id(0)
    g = tl.arange(0, NG_P2)[:, None]
    c = tl.arange(0, GROUP)[None, :]
    offs = g * GROUP + c  # (NG_P2, GROUP)
    mask = g < NG
    row = m * H
    h = tl.load(hidden_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(residual_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    res = (h + r).to(tl.bfloat16)
    tl.store(res_out_ptr + row + offs, res, mask=mask)
    resf = res.to(tl.float32)
    ss = tl.sum(tl.sum(resf * resf, axis=1), axis=0)
    # IEEE division and square root, as the reference: Triton's "/" and tl.sqrt are approximations, and one
    # ulp of rstd flips bf16 roundings of x (and so a_q codes and router logits)
    one = tl.full(ss.shape, 1.0, tl.float32)
    rstd = tl.math.div_rn(one, tl.math.sqrt_rn(tl.math.div_rn(ss, tl.full(ss.shape, H, tl.float32)) + eps))
    w = tl.load(norm_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = ((resf * rstd).to(tl.bfloat16).to(tl.float32) * w).to(tl.bfloat16)
    tl.store(x_out_ptr + row + offs, x, mask=mask)
    xf = x.to(tl.float32)
    amax = tl.max(_abs_not_nan(xf), axis=1)
    # div_rn: IEEE division like vLLM's kernel (Triton's "/" is div.full, an approximation)
    scale = tl.math.div_rn(tl.maximum(amax, QUANT_EPS), tl.full(amax.shape, FP8_MAX, tl.float32))
    q = _clamp_fp8(tl.math.div_rn(xf, scale[:, None] + tl.zeros_like(xf))).to(tl.float8e4nv)
    tl.store(q_ptr + row + offs, q, mask=mask)
    tl.store(s_ptr + m * NG + tl.arange(0, NG_P2), scale, mask=tl.arange(0, NG_P2) < NG)


@triton.jit
def skinny_gemm_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr, M,
                       N: tl.constexpr, K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       BLOCK_SCALED: tl.constexpr, OUT_BF16: tl.constexpr):
    """out[m, n] = sum_k a[m, k] * w[n, k] for M <= BM tokens, "swap AB": the tensor-core tile is
    (BN weight rows) x (BM tokens), so the weights fill the MMA's large dimension.

    Program (pid_n, pid_k) covers BN columns and K range [pid_k * K_PER_SPLIT, +K_PER_SPLIT). With more than
    one split, it writes fp32 partials to out[pid_k, m, n] and the consumer kernel adds them in split order
    (deterministic; no atomics, no extra reduction kernel).
    BLOCK_SCALED: a and w are FP8 with per-(token, 128-K group) and per-(128 x 128 block) scales; BK = 128."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_mask = rm < M
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    for k0 in range(k_begin, k_begin + K_PER_SPLIT, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=m_mask[:, None], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * K + (k0 + rk)[None, :])
        if BLOCK_SCALED:
            # e4m3 -> f16 is exact, and the f16 tensor-core path accumulates in full fp32; Hopper's FP8 path
            # keeps only ~14 mantissa bits while accumulating, which moved shared_out by up to 2% (in GPU tests)
            a = a.to(tl.float16)
            w = w.to(tl.float16)
        part = tl.dot(w, tl.trans(a))  # (BN, BM), fp32 accumulate
        if BLOCK_SCALED:
            kb = k0 // BK
            a_s = tl.load(a_scale_ptr + rm * (K // BK) + kb, mask=m_mask, other=0.0)
            w_s = tl.load(w_scale_ptr + (pid_n * BN // 128) * (K // 128) + kb)
            acc += part * (a_s[None, :] * w_s)
        else:
            acc += part
    out_offs = pid_k * M * N + rm[None, :] * N + rn[:, None]
    out_mask = m_mask[None, :]
    if OUT_BF16:
        tl.store(out_ptr + out_offs, acc.to(tl.bfloat16), mask=out_mask)
    else:
        tl.store(out_ptr + out_offs, acc, mask=out_mask)


@triton.jit
def _sortable_key(v):
    """float32 -> int32 with the same order (total order; -inf maps above INT_MIN + 1)."""
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def grouped_topk_kernel(partials_ptr, logits_ptr, bias_ptr, w_out_ptr, id_out_ptr, scaling, M,
                        SPLITS: tl.constexpr, E: tl.constexpr, G: tl.constexpr, EPG: tl.constexpr, TOPK_GROUP: tl.constexpr,
                        TOPK: tl.constexpr, TOPK_P2: tl.constexpr, FOLD_SCALING: tl.constexpr):
    """One program per token: sigmoid scores, biased selection scores, group score = sum of top-2,
    keep the best TOPK_GROUP groups, TOPK experts among them (ties -> lower index, NaN never wins),
    renormalized unbiased weights; no finite group score -> experts 0..TOPK-1 at 1/TOPK.
    First adds the router GEMM's SPLITS fp32 partials in order and stores the logits."""
    t = tl.program_id(0)
    INT_MIN: tl.constexpr = -2147483648
    e2 = tl.arange(0, G)[:, None] * EPG + tl.arange(0, EPG)[None, :]  # (G, EPG)
    logit = tl.load(partials_ptr + t * E + e2)
    for sp in tl.static_range(1, SPLITS):
        logit += tl.load(partials_ptr + (sp * M + t) * E + e2)
    tl.store(logits_ptr + t * E + e2, logit)
    s = 1.0 / (1.0 + tl.exp(-logit))
    b = s + tl.load(bias_ptr + e2)
    b = tl.where(b != b, float("-inf"), b)
    key = _sortable_key(b)
    # group score: top-2 sum (first max removed by position, so a repeated max counts twice)
    col = tl.arange(0, EPG)[None, :]
    i1 = tl.argmax(key, axis=1, tie_break_left=True)
    m1 = tl.max(b, axis=1)
    m2 = tl.max(tl.where(col == i1[:, None], float("-inf"), b), axis=1)
    gs = m1 + m2
    gs = tl.where(gs != gs, float("-inf"), gs)
    any_finite = tl.max((gs > float("-inf")).to(tl.int32), axis=0)
    gkey = _sortable_key(gs)
    gidx = tl.arange(0, G)
    keep = gidx < 0
    for _ in tl.static_range(TOPK_GROUP):
        gi = tl.argmax(gkey, axis=0, tie_break_left=True)
        keep = keep | (gidx == gi)
        gkey = tl.where(gidx == gi, INT_MIN, gkey)
    # experts outside kept groups rank below every kept one; chosen ones below everything
    ekey = tl.reshape(tl.where(keep[:, None], key, INT_MIN + 1), (E,))
    sflat = tl.reshape(s, (E,))
    eidx = tl.arange(0, E)
    kidx = tl.arange(0, TOPK_P2)
    ids = tl.zeros((TOPK_P2,), dtype=tl.int32)
    ws = tl.zeros((TOPK_P2,), dtype=tl.float32)
    for k in tl.static_range(TOPK):
        ei = tl.argmax(ekey, axis=0, tie_break_left=True)
        wk = tl.sum(tl.where(eidx == ei, sflat, 0.0), axis=0)
        ids = tl.where(kidx == k, ei, ids)
        ws = tl.where(kidx == k, wk, ws)
        ekey = tl.where(eidx == ei, INT_MIN, ekey)
    ws = ws / (tl.sum(ws, axis=0) + 1e-20)
    dead = any_finite == 0
    ids = tl.where(dead, kidx, ids)
    ws = tl.where(dead, 1.0 / TOPK, ws)
    if FOLD_SCALING:
        ws = ws * scaling
    kmask = kidx < TOPK
    tl.store(w_out_ptr + t * TOPK + kidx, ws, mask=kmask)
    tl.store(id_out_ptr + t * TOPK + kidx, ids, mask=kmask)


@triton.jit
def moe_align_kernel(topk_ids_ptr, sorted_ptr, expert_ids_ptr, ntpp_ptr, cursor_ptr,
                     FIRST, P: tl.constexpr, MAX_PADDED: tl.constexpr, MAX_BLOCKS: tl.constexpr,
                     NL: tl.constexpr, NB: tl.constexpr, BS: tl.constexpr, CHUNK: tl.constexpr):
    """Single program. Pairs (flat id p = t * top_k + k) routed to local experts are grouped by expert in
    ascending flat id, each expert padded to a multiple of BS with the sentinel P; expert_ids gets the
    local expert of each block and -1 after the last one. NB = next power of two > NL (bin NB-1 collects
    pairs of other ranks). cursor_ptr: NB int32 of scratch."""
    bins = tl.arange(0, NB)
    cidx = tl.arange(0, CHUNK)
    counts = tl.zeros((NB,), dtype=tl.int32)
    for c0 in range(0, P, CHUNK):
        p = c0 + cidx
        e = tl.load(topk_ids_ptr + p, mask=p < P, other=-1) - FIRST
        lid = tl.where((e >= 0) & (e < NL) & (p < P), e, NB - 1)
        counts += tl.histogram(lid, NB)
    counts = tl.where(bins < NL, counts, 0)
    padded = (counts + BS - 1) // BS * BS
    ends = tl.cumsum(padded, axis=0)
    offsets = ends - padded
    total = tl.sum(padded, axis=0)
    # fill: sentinel everywhere, -1 for every block; the scatter below overwrites (after a CTA barrier)
    for i0 in range(0, MAX_PADDED, CHUNK):
        i = i0 + cidx
        tl.store(sorted_ptr + i, tl.zeros((CHUNK,), dtype=tl.int32) + P, mask=i < MAX_PADDED)
    tl.store(cursor_ptr + bins, offsets)
    tl.store(ntpp_ptr, total)
    # expert of block b: number of experts whose padded range ends at or before b * BS
    for b0 in range(0, MAX_BLOCKS, CHUNK):
        blk = b0 + cidx
        start = blk * BS
        eid = tl.sum(((ends[None, :] <= start[:, None]) & (bins[None, :] < NL)).to(tl.int32), axis=1)
        eid = tl.where(start < total, eid, -1)
        tl.store(expert_ids_ptr + blk, eid, mask=blk < MAX_BLOCKS)
    tl.debug_barrier()
    for c0 in range(0, P, CHUNK):
        p = c0 + cidx
        e = tl.load(topk_ids_ptr + p, mask=p < P, other=-1) - FIRST
        valid = (e >= 0) & (e < NL) & (p < P)
        lid = tl.where(valid, e, NB - 1)
        # rank among earlier pairs of the same expert inside this chunk
        same = (lid[:, None] == lid[None, :]) & (cidx[None, :] < cidx[:, None])
        rank = tl.sum(same.to(tl.int32), axis=1)
        base = tl.load(cursor_ptr + lid, mask=valid, other=0)
        tl.store(sorted_ptr + base + rank, p, mask=valid)
        tl.debug_barrier()
        cur = tl.load(cursor_ptr + bins) + tl.histogram(lid, NB)
        tl.debug_barrier()
        tl.store(cursor_ptr + bins, cur)
        tl.debug_barrier()


@triton.jit
def silu_mul_quant_kernel(partials_ptr, q_ptr, s_ptr, M, SPLITS: tl.constexpr, I: tl.constexpr,
                          GROUP: tl.constexpr):
    """Program (m, g): gate_up = bf16(sum of the GEMM's SPLITS fp32 partials, in order);
    h = bf16(bf16(silu(gate)) * up) for one 128-group of h, then its FP8 quantization."""
    m = tl.program_id(0)
    g = tl.program_id(1)
    c = g * GROUP + tl.arange(0, GROUP)
    gate = tl.load(partials_ptr + m * 2 * I + c)
    up = tl.load(partials_ptr + m * 2 * I + I + c)
    for sp in tl.static_range(1, SPLITS):
        gate += tl.load(partials_ptr + (sp * M + m) * 2 * I + c)
        up += tl.load(partials_ptr + (sp * M + m) * 2 * I + I + c)
    gate = gate.to(tl.bfloat16).to(tl.float32)
    up = up.to(tl.bfloat16).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(tl.bfloat16).to(tl.float32)
    h = (act * up).to(tl.bfloat16).to(tl.float32)
    amax = tl.maximum(tl.max(_abs_not_nan(h), axis=0), QUANT_EPS)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX, tl.float32))
    tl.store(q_ptr + m * I + c, _clamp_fp8(tl.math.div_rn(h, scale + tl.zeros_like(h))).to(tl.float8e4nv))
    tl.store(s_ptr + m * (I // GROUP) + g, scale)
