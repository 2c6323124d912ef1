"""The persistent pre-amble kernel (CuTe DSL): one CTA per SM, a device-side task queue, dataflow counters.

What it computes: every output of megapre.run for M <= 8 tokens (see megapre/host/plan.py for the task
protocol and megapre/host/reference.py for the semantics). Stages, each a device function that the queue
loop dispatches to, and that ``mode >= 0`` runs alone (tile = blockIdx.x) for per-stage testing
(mode -1: the full queue. CTA b starts on task b -- under programmatic dependent launch while the previous
kernel drains, its weight loads first, griddepcontrol.wait only before it touches what that kernel may read or
write -- and ``prefetch_ctas`` CTAs after the norm CTAs ask L2 for the weights at their start; 0 turns that
off):

    norm     (token x 1024 cols)   residual add, RMSNorm (whole row), x (bf16, workspace), a_q / a_scale
    router   (row tile x K split)  x @ gate_weight.T partials (fp32, workspace)
    gate_up  (row tile x K split)  block-scaled FP8 partials of a_q @ w13.T (fp32, workspace); in counter builds its
                                   share of the residual output (with norm_flags, or run alone, the norm writes it)
    route    (one task)            warp m: logits = sum of partials, sigmoid, grouped top-k, weights of token m;
                                   then the CTA: moe_align_block_size over the local experts
    act      (one task per 128 h)  TP1 only: gate_up = bf16(sum of partials); h = silu(gate) * up; FP8 of h
    down     (row tile)            (TP8: the act step first, into shared memory -- spec.fuse_act) then
                                   block-scaled FP8 h_q @ w2.T -> shared_out (bf16)

Nothing is reset between launches: the ticket counter and the counters only grow, and a CTA derives its launch
number from the ticket counter (plan.py, learn_launch). Stages nobody waits on (route, down) signal nothing.
TP8 at M <= 5 (KernelSpec.norm_flags / down_flags): the norm's outputs and the gate_up partials flag themselves
instead -- written into a launch-parity block whose words start as a sentinel, which the producer refills in the
other block for the next launch; their consumers (router, gate_up, the act inside the down tasks) load until no word
is the sentinel, and the norm and gate_up tasks signal nothing (docs/design.md).

GEMMs (M <= 8 makes them weight streams), "swap AB" with the weights as the A operand and the <= 8 tokens as B:
the bf16 router on mma.sync m16n8k16, the FP8 GEMMs on wgmma m64n8k32 e4m3 (QGMMA) with A from registers, see
mma_issue / mma_consume / qgmma_consume. Split-K partials are added by
the consumer in split order and K groups inside a task in warp order: no float atomics, bitwise-repeatable
results.

Limits: M <= 8, 256 experts, hidden a multiple of 1024 (KernelSpec.unsupported says which shapes).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint32
from cutlass.memory import SmemAllocator

from ..host.plan import (ACT, DOWN, GATE_UP, N_COUNTERS, NORM, PERIOD_CTAS, PERIOD_SLOTS, PHASE_SLOTS, ROUTE, ROUTER,
                         TARGET_BITS, TERMINAL_STAGES, THREADS, TILE_BITS, TRACE_INTS, TRACE_POINTS, TRACE_RETRIES,
                         WARPS, WS_COUNTERS, WS_ERROR, WS_ERRPTR, WS_HEAD, WS_TOKCTR, KernelSpec, task_table,
                         terminal_tasks)
from . import primitives as P

SPIN_LIMIT = 1 << 22  # ~0.5 s of polling; past it a wait gives up, records an error and moves on
HOT_SPINS = 256  # polls without a sleep before backing off (nanosleep's granularity is coarser than a hop)
NEG_INF = float("-inf")
INT_MIN = -2147483648


def build_kernel(spec: KernelSpec):
    """Return (kernel, launcher) for cute.compile. All shape numbers are compile-time constants."""
    S = spec
    M, H, E, NG = S.m, S.hidden, S.experts, S.hidden_groups
    I = S.inter  # noqa: E741
    LAY = S.ws_layout()
    OFF_X, OFF_RP, OFF_GU, OFF_GX, OFF_HQ, OFF_HS, OFF_TR, OFF_PH = (
        LAY[k] for k in ("x", "router_part", "gu_part", "gu_fixed", "h_q", "h_scale", "trace", "phases"))
    OFF_PERIOD = LAY["period"]
    OFF_GXF = OFF_GX + S.gu_fixed_flags_at  # the per-token fallback flags after the fixed-point sums
    # The norm's outputs as its consumers read them (x, copies of a_q / a_scale) and the fixed-point sums: two
    # blocks each, launch L using block L % 2 (KernelSpec.norm_flags; launch_parity)
    OFF_AQC, OFF_ASC = LAY["aq_copy"], LAY["as_copy"]
    XB, AQB, ASB, GXB = S.x_block, S.aq_block, S.as_block, S.gu_fixed_bytes
    FLAGS = S.norm_flags
    DFLAGS = S.down_flags  # the gate_up partials flag themselves too (the act inside the down tasks polls them)
    GUB = S.gu_block
    RFLAGS = S.route_flags  # ... and the router partials (the route polls them)
    RPB = S.router_block
    # The fused act's first loads before the down task's weights (stage_down): with flagged partials at M = 2 only.
    # H200, session 25, against weights first (whose moves hold the act's loads until the weights are in): M = 2
    # -0.05..-0.23 us (six rounds, two calls), but M = 1 +0.2..+0.35, M = 3 / 4 +0.4..+0.65, M = 5 +0.8..+1.06.
    ACT_LOADS_FIRST = DFLAGS and M == 2
    # A flagged down task at M >= 2 votes on the sentinel check right after its act's loads and does the act's math
    # only in the round where every partial was in (act_bad_flagged, act_math_flagged): on the sentinel NaNs a
    # too-early round's SiLU took its double-precision fallback, so a failed round was slow as well as wasted.
    # H200, session 26, against the math in every round: M = 3 / 4 / 5 -0.2..-0.34 / -0.23..-0.27 / -0.45 us, M = 2
    # even; at M = 1 (whose first round mostly succeeds) +0.1..+0.16, so M = 1 keeps the math in every round.
    VOTE_FIRST = DFLAGS and M >= 2
    SENT = -1  # plan.NORM_SENTINEL as an int32
    # A gate_up partial goes into the fixed-point sum when |p| < GU_FIX_LIMIT, so that the sum of all splits
    # stays below 2^63 (primitives.FIX_BITS); else (NaN, inf, huge) its token's flag is set, and the act sums
    # that token's fp32 partials instead, in split order, as before the fixed-point sums.
    GU_FIX_LIMIT = float(2 ** (63 - P.FIX_BITS - (S.gu_splits - 1).bit_length()))
    GU_FIXED = S.gu_fixed  # (TP8 at M = 8: KernelSpec.gu_fixed)
    QGMMA = S.fp8_mma == "qgmma"
    EPL = E // 32  # experts per lane in the top-k warp
    LPG = S.experts_per_group // EPL  # lanes per group
    P_PAIRS = M * S.top_k
    SF = S.smem_floats()
    NCHUNK = S.norm_tasks_per_token  # norm tasks per token, each norm_groups 128-groups: one or two per warp
    ROW_ITERS = NG // WARPS  # a norm task reads its token's whole row: group warp + 8 i in iteration i
    SL = S.smem_layout()
    NT = S.n_tasks
    WHATIF = set(S.whatif)  # what-if builds (bench only): work left out, see plan.WHATIF_PARTS
    WHATIF_NO_WEIGHTS = "weights" in WHATIF
    WAITED = S.waited_counters()  # counters some task waits on; the other stages signal nothing
    TILES = [S.stage_tiles()[c] for c in range(N_COUNTERS)]  # signals per launch on each counter
    # trace builds: the table row of a stage's tile 0 (the table lists each stage's tiles in order, stage by stage)
    FIRST_ROW = {}
    for i, row in enumerate(task_table(S)):
        FIRST_ROW.setdefault(row[0], i)
    S_ACT, S_AS, S_RED = SL["act"], SL["ascale"], SL["red"]
    # int scratch layout (int32 index)
    SI_TASK, SI_RED, SI_PAD, SI_END, SI_WTOT, SI_TOPK, SI_CNT = 0, 16, 96, 352, 608, 640, 704
    # the task slot SI_TASK + : 0 ticket (task index), 1 stage (= the counter it signals), 2 tile, 3 wait
    # counter, 4 wait target, 5 whether this CTA had seen the norm complete before this task started (a copy of
    # 11, taken when the task is decoded), 6 launch number (mod 2^32), 7 the next ticket when a terminal task took
    # it early (-1: none), 8-9 the launch's first ticket (u64), 10 whether 6 and 8 are known, 11 whether a wait of
    # this CTA has seen every norm task of this launch done (counter builds: not norm_flags), 12-13 / 14-15 trace:
    # when the task was taken / its inputs were ready
    T_NORM_AT_START, T_LAUNCH, T_NEXT, T_WINDOW, T_KNOWN, T_NORM_SEEN, T_TAKEN, T_READY = 5, 6, 7, 8, 10, 11, 12, 14
    # the table's terminal tasks (plan.TERMINAL_STAGES): the route task and the down tasks from D_FIRST to the end
    R_IDX, D_FIRST = terminal_tasks(S)
    STATIC_CAP = S.static_cap  # CTA b < min(grid, n_tasks, STATIC_CAP) starts on task b (KernelSpec.n_static)
    EXIT_NOW = 1 << 20  # T_NEXT: this CTA leaves after its task (a ticket index past any table)
    NORM_TASKS = S.stage_tiles()[NORM]  # the first tasks of the table: CTAs 0 .. NORM_TASKS - 1 start on them
    # The norm tasks signal their counter themselves and wait for each other before the residual output (stage_norm)
    # where no other task waits for the norm (KernelSpec.norm_flags, and the what-if builds without such waits).
    NORM_SELF_RELEASE = FLAGS
    RELEASER = 32  # the thread that signals a finished task's counter (warp 1: not the ticket-taking thread 0)
    FIRST_TASK = 2  # the stages' `waits` argument: 0 = run alone (mode >= 0), 1 = queue task, 2 = a CTA's first
    PAIR_WARPS = (P_PAIRS + 31) // 32  # warps holding one (token, expert) pair per lane in the token sort
    # the L2 weight prefetch a CTA's first GEMM task issues after its own weight loads (prefetch_after_weights): its
    # slice (-1: none), the number of slices, then the w13 and w2 addresses (u64); set by thread 0 in the prologue
    SI_PF = 1272
    SI_WAIT_T = KernelSpec.SMEM_INTS - 2  # (what-if "stamps": int64, after SI_PF's 6 words)
    STAMPS = "stamps" in S.whatif
    assert SI_CNT + PAIR_WARPS * THREADS <= SI_PF and SI_PF + 6 <= KernelSpec.SMEM_INTS
    # 8-input sorting network (19 comparators, depth 6): position a receives the better of (a, b)
    SORT8 = (((0, 2), (1, 3), (4, 6), (5, 7)), ((0, 4), (1, 5), (2, 6), (3, 7)), ((0, 1), (2, 3), (4, 5), (6, 7)),
             ((2, 4), (3, 5)), ((1, 4), (3, 6)), ((1, 2), (3, 4), (5, 6)))
    assert EPL == 8

    # ------------------------------------------------------------------------------------------------
    # stage: residual add + RMSNorm + MoE input quantization of one chunk of one token (norm_groups 128-groups:
    # one or two per warp, 4 columns per lane). (Running this inside every router and gate_up task at M <= 2,
    # which removes the norm stage and its hop, was measured at 009b80a: 112 CTAs re-reading the rows at once
    # made each task's norm take ~2 us instead of ~1.4, and the call got slower: 9.75 / 11.28 us at M = 1 / 2.)
    # ------------------------------------------------------------------------------------------------
    def residual_add(h0, h1, r0, r1):
        """4 columns of residual = bf16(hidden + residual) (two packed bf16 pairs of each), as fp32 values."""
        ha, hb = P.bf16x2_to_f32(h0)
        hc, hd = P.bf16x2_to_f32(h1)
        ra, rb = P.bf16x2_to_f32(r0)
        rc, rd = P.bf16x2_to_f32(r1)
        a, b = P.round_bf16x2(ha + ra, hb + rb)
        c, d = P.round_bf16x2(hc + rc, hd + rd)
        return [a, b, c, d]

    @cute.jit
    def norm_row(m: Int32, hidden: Int64, residual: Int64, si: Int32, tid: Int32, trace_tile: Int32, ws: Int64,
                 t_head: Int64):
        """Token m's whole row, all threads of the CTA: (this thread's residual values -- group warp + 8 i, 4
        columns, for every i --, rstd). Every norm task reads the whole row for the sum of squares (L2 serves the
        repeats); the sum is taken in a fixed order (lanes, butterfly, then warps), so every task gets the same
        rstd bits. t_head: a ticket-counter value thread 0 read after griddepcontrol.wait, from which it learns the
        launch number here, where the row's loads have had their round trip (queue tasks whose CTA does not know it
        yet)."""
        warp = tid >> 5
        lane = tid & 31
        mine = []
        ss = Float32(0.0)
        for i in cutlass.range_constexpr(ROW_ITERS):
            g = warp + WARPS * i
            off = Int64(m * H + g * 128 + lane * 4) * 2
            # coherent loads (not .nc): the previous kernel writes these, and ptxas moves .nc loads above
            # griddepcontrol.wait (seen in the SASS at ec53080)
            h0, h1 = P.ld_cg_v2(hidden + off)
            r0, r1 = P.ld_cg_v2(residual + off)
            v = residual_add(h0, h1, r0, r1)
            for j in cutlass.range_constexpr(4):
                ss = ss + v[j] * v[j]
            mine.append(v)
        ss = P.warp_sum_f32(ss)
        if lane == 0:
            P.sts_f32(si + (SI_RED + warp) * 4, ss)
        if cutlass.const_expr(FLAGS):
            if tid == 0:  # (nested: `tid == 0 and lds(...)` has every thread read the slot thread 0 writes)
                if P.lds_b32(si + (SI_TASK + T_KNOWN) * 4) == 0:
                    learn_launch(t_head, si)
        cute.arch.sync_threads()
        stamp(NORM, 1, trace_tile, ws, tid)
        tot = Float32(0.0)
        for w in cutlass.range_constexpr(WARPS):
            tot = tot + P.lds_f32(si + (SI_RED + w) * 4)
        cute.arch.sync_threads()  # SI_RED is free again (the next token's sum may follow)
        rstd = P.rms_rstd(tot, H, S.eps)  # = 1 / sqrt(tot / H + eps) with IEEE fp32 roundings, branch-free
        return mine, rstd

    def norm_group_math(mine, rstd, g, w_smem: Int32):
        """Group g of the token (this warp's: g = warp + 8 i for a dynamic i), with the norm weights parked at
        w_smem: (residual values v, x, the e4m3 codes of x, the group's scale)."""
        warp_i = g >> 3  # = i
        v = [Float32(0.0)] * 4
        for i in range(ROW_ITERS):
            for j in range(4):
                v[j] = P.sel_f32(warp_i == i, mine[i][j], v[j])
        w0, w1 = P.lds_v2(w_smem)
        wa, wb = P.bf16x2_to_f32(w0)
        wc, wd = P.bf16x2_to_f32(w1)
        wv = [wa, wb, wc, wd]
        n0, n1 = P.round_bf16x2(v[0] * rstd, v[1] * rstd)
        n2, n3 = P.round_bf16x2(v[2] * rstd, v[3] * rstd)
        x0, x1 = P.round_bf16x2(n0 * wv[0], n1 * wv[1])
        x2, x3 = P.round_bf16x2(n2 * wv[2], n3 * wv[3])
        x = [x0, x1, x2, x3]
        q, scale = quant_group(x[0], x[1], x[2], x[3])
        return v, x, q, scale

    def norm_group_store(vals, g, m: Int32, o_aq: Int64, ws: Int64, lane: Int32, p: Int32, p_next: Int32):
        """... its stores but the scale and the residual output (norm_group_store_scale / _res): x and the a_q copy
        into block p for this launch's consumers (flagged data: a canonical NaN in place of a sentinel word), the
        a_q output, and the sentinel into the same words of block p_next for the next launch (queue only: that block
        was the previous launch's, whose readers have all finished)."""
        v, x, q, _ = vals
        col = g * 128 + lane * 4
        off = Int64(m * H + col) * 2
        x01 = P.f32x2_to_bf16x2(x[0], x[1])
        x23 = P.f32x2_to_bf16x2(x[2], x[3])
        if cutlass.const_expr(FLAGS):
            P.st_relaxed_v2(ws + OFF_X + Int64(p * XB) + off, unflag(x01, 0x7FFF7FFF), unflag(x23, 0x7FFF7FFF))
            P.st_relaxed_b32(ws + OFF_AQC + Int64(p * AQB + m * H + col), unflag(q, 0x7F7F7F7F))
        else:
            P.st_v2(ws + OFF_X + off, x01, x23)
        P.st_b32(o_aq + Int64(m * H + col), q)
        if cutlass.const_expr(FLAGS):
            P.st_v2(ws + OFF_X + Int64(p_next * XB) + off, Uint32(0xFFFFFFFF), Uint32(0xFFFFFFFF))
            P.st_b32(ws + OFF_AQC + Int64(p_next * AQB + m * H + col), Uint32(0xFFFFFFFF))

    def norm_group_store_scale(vals, g, m: Int32, o_as: Int64, ws: Int64, p: Int32, p_next: Int32):
        """Lane 0: the group's scale (never a NaN: amax >= 1e-10), its copy, and the copy's sentinel for the next
        launch."""
        P.st_f32(o_as + Int64(m * NG + g) * 4, vals[3])
        if cutlass.const_expr(FLAGS):
            P.st_relaxed_f32(ws + OFF_ASC + Int64(p * ASB) + Int64(m * NG + g) * 4, vals[3])
            P.st_b32(ws + OFF_ASC + Int64(p_next * ASB) + Int64(m * NG + g) * 4, Uint32(0xFFFFFFFF))

    @cute.jit
    def unflag(w: Uint32, canonical: cutlass.Constexpr) -> Uint32:
        """A flagged word as written: the sentinel (two bf16 / four e4m3 NaNs, which the norm's arithmetic does not
        produce) replaced by the canonical NaNs, so that a consumer never takes a written word for an unwritten one."""
        return Uint32(P.sel_i32(Int32(w) == SENT, Int32(canonical), Int32(w)))

    def store_flagged_f32(addr0: Int64, block: cutlass.Constexpr, p: Int32, val: Float32):
        """A flagged fp32 word (a GEMM partial): val at addr0 in block p (canonical NaN for the sentinel pattern),
        the sentinel at the same place in the other block, for the next launch."""
        P.st_relaxed_b32(addr0 + Int64(p * block), unflag(Uint32(P.f32_as_i32(val)), 0x7FFFFFFF))
        P.st_b32(addr0 + Int64((1 - p) * block), Uint32(0xFFFFFFFF))

    def norm_group_store_res(vals, g, m: Int32, o_res: Int64, lane: Int32):
        """The group's residual output. In the queue only once every norm task has read its rows (stage_norm):
        out.residual may be the residual input (an in-place update, vLLM's habit), and a norm task reads its
        token's whole row while the token's other norm tasks write their chunks of it."""
        v = vals[0]
        P.st_v2(o_res + Int64(m * H + g * 128 + lane * 4) * 2, P.f32x2_to_bf16x2(v[0], v[1]),
                P.f32x2_to_bf16x2(v[2], v[3]))

    @cute.jit
    def quant_group(x0: Float32, x1: Float32, x2: Float32, x3: Float32):
        """FP8 of a warp's 128-group (4 values per lane): (4 e4m3 codes packed, the group's scale)."""
        amax = P.fmax(P.warp_amax(x0, x1, x2, x3), Float32(1e-10))  # one redux.sync instead of five shuffle rounds
        # = IEEE fl32(amax / 448) and fl32(x_i / scale), bit for bit, without div.rn's branches: on the FMA pipe
        # (P.div_fast) where that is exact -- amax <= 2^60, so the scale and every quotient stay in range --, else
        # in double precision. amax is the warp's (redux), so the branch is warp-uniform. (NaNs: left out of amax, and
        # their quotients clamp to -448 in f32x4_to_e4m3x4, as vLLM's fmaxf / fminf kernel gives them.)
        scale = P.div_fast(amax, Float32(448.0))
        q0, q1, q2, q3 = P.div4_by_fast(scale, x0, x1, x2, x3)
        if P.div_fast_ok(amax, Float32(448.0)) == 0:  # inf or huge
            scale = P.div448(amax)
            q0, q1, q2, q3 = P.div4_by(scale, x0, x1, x2, x3)
        q = P.f32x4_to_e4m3x4(q0, q1, q2, q3)
        return q, scale

    GX_CHUNK = (S.gu_fixed_bytes + NORM_TASKS * 16 - 1) // (NORM_TASKS * 16) * 16  # bytes per norm task

    @cute.jit
    def gu_fixed_zero(tile: Int32, ws: Int64, tid: Int32):
        """Norm task `tile` zeroes its slice of the gate_up fixed-point sums and flags: after the previous
        kernel's end (its act read them), before this task's release (every gate_up task waits for it)."""
        for i in cutlass.range_constexpr((GX_CHUNK // 16 + THREADS - 1) // THREADS):
            off = tile * GX_CHUNK + (tid + i * THREADS) * 16
            if tid + i * THREADS < GX_CHUNK // 16 and off < S.gu_fixed_bytes:
                P.st_v4f(ws + OFF_GX + Int64(off), Float32(0.0), Float32(0.0), Float32(0.0), Float32(0.0))

    @cute.jit
    def stage_norm(tile: Int32, hidden: Int64, residual: Int64, norm_w: Int64, o_res: Int64, o_aq: Int64,
                   o_as: Int64, ws: Int64, sf: Int32, si: Int32, tid: Int32, waits: Int32):
        """Task (token m, chunk c of norm_groups 128-groups): residual out, x (bf16, workspace), a_q / a_scale.
        Warp w takes the chunk's groups g = w (mod 8): one when norm_groups = 8, one or two when 9..16."""
        G = S.norm_groups
        m = tile // NCHUNK
        c = tile % NCHUNK
        warp = tid >> 5
        lane = tid & 31
        g1 = c * G + ((warp - c * G) & (WARPS - 1))  # this warp's first group of the chunk (= c * 8 + warp at G = 8)
        # its second (G > 8): g1 + 8 where that is still in the chunk; elsewhere g1 again, computed but not stored
        g2 = g1
        two = Int32(0)
        if cutlass.const_expr(G > WARPS):
            two = P.sel_i32(g1 + WARPS < (c + 1) * G, 1, 0)
            g2 = P.sel_i32(two != 0, g1 + WARPS, g1)
        # the norm weights are the only load from HBM here (a new weight set every layer): issue them first,
        # before the previous kernel has finished (PDL) when this is the CTA's first task
        w0, w1 = P.ld_nc_v2(norm_w + Int64(g1 * 128 + lane * 4) * 2)
        # ... and park them in shared memory: ptxas sinks a read-only (.nc) load that is only used after a
        # bar.sync to below it, where its latency under the weight stream (~1 us at M = 1, 9411fc1's timeline)
        # adds to the task; a shared store cannot cross the barrier, so the load stays up here
        P.sts_v2(sf + S_ACT + tid * 8, w0, w1)
        if cutlass.const_expr(G > WARPS):
            w2, w3 = P.ld_nc_v2(norm_w + Int64(g2 * 128 + lane * 4) * 2)
            P.sts_v2(sf + S_ACT + (THREADS + tid) * 8, w2, w3)
        griddep_if_first(waits, si)  # hidden and residual come from the previous kernel
        stamp(NORM, 0, tile, ws, tid)
        if cutlass.const_expr("norm" in WHATIF):
            return
        # the launch number (for the parity blocks), read with the row: norm_row learns it behind the row's loads
        t_head = Int64(0)
        if cutlass.const_expr(FLAGS):
            if tid == 0:
                if P.lds_b32(si + (SI_TASK + T_KNOWN) * 4) == 0:
                    t_head = P.ld_relaxed_u64(ws + WS_HEAD * 4)
        mine, rstd = norm_row(m, hidden, residual, si, tid, tile, ws, t_head)
        p = launch_parity(si)
        p_next = p  # (no flags: one block, which the counters -- or the kernel boundary -- order)
        if cutlass.const_expr(FLAGS):
            p_next = 1 - p
        if cutlass.const_expr(GU_FIXED):
            gu_fixed_zero(tile, ws + Int64(p_next * GXB), tid)  # the next launch's block (this one's: the last's)
        # Both groups' math in straight-line code before any store, so that ptxas interleaves the two dependency
        # chains (rounding, amax, the double-precision divisions): one after the other they took 1.3 us at M = 8
        # against 0.6 for one group (session 14's traces).
        r1 = norm_group_math(mine, rstd, g1, sf + S_ACT + tid * 8)
        r2 = r1
        if cutlass.const_expr(G > WARPS):
            r2 = norm_group_math(mine, rstd, g2, sf + S_ACT + (THREADS + tid) * 8)
        norm_group_store(r1, g1, m, o_aq, ws, lane, p, p_next)
        if lane == 0:
            norm_group_store_scale(r1, g1, m, o_as, ws, p, p_next)
        if cutlass.const_expr(G > WARPS):
            if two != 0:
                norm_group_store(r2, g2, m, o_aq, ws, lane, p, p_next)
                if lane == 0:
                    norm_group_store_scale(r2, g2, m, o_as, ws, p, p_next)
        stamp(NORM, 2, tile, ws, tid)
        if cutlass.const_expr(NORM_SELF_RELEASE):
            # The residual output, in the queue: only after every norm task of the token has read its row (an
            # in-place update overwrites the residual input). The last of them to count itself in the token's counter
            # (acquire-release: the others' reads happened before their increments) writes the whole row -- it has
            # every value of it in registers. The others leave at once: no task waits for another here (a wait of
            # every norm task for all the others held TP1's norm CTAs ~2 us from their next gate_up tasks, session 24).
            cute.arch.sync_threads()  # every thread's reads of the row happened before the increment below
            if tid == 0:
                seen = P.atom_add_acq_rel(ws + (WS_TOKCTR + m) * 4, Int32(1))
                base = P.lds_b32(si + (SI_TASK + T_LAUNCH) * 4) * NCHUNK
                P.sts_b32(si + SI_RED * 4, P.sel_i32(seen - base == NCHUNK - 1, 1, 0))
            cute.arch.sync_threads()
            if P.lds_b32(si + SI_RED * 4) != 0:
                for i in cutlass.range_constexpr(ROW_ITERS):
                    v = mine[i]
                    P.st_v2(o_res + Int64(m * H + (warp + WARPS * i) * 128 + lane * 4) * 2,
                            P.f32x2_to_bf16x2(v[0], v[1]), P.f32x2_to_bf16x2(v[2], v[3]))
        else:  # the gate_up tasks write it (gate_up_residual_*), once every norm task has finished; or run alone
            if waits == 0:
                norm_group_store_res(r1, g1, m, o_res, lane)
                if cutlass.const_expr(G > WARPS):
                    if two != 0:
                        norm_group_store_res(r2, g2, m, o_res, lane)

    # ------------------------------------------------------------------------------------------------
    # GEMM building block: stream RPW rows per warp over KC columns against activations staged in smem
    # ------------------------------------------------------------------------------------------------
    # ------------------------------------------------------------------------------------------------
    # Tensor-core GEMM tile: mma.sync m16n8k16 "swap AB" -- 16 weight rows (A) x 8 token columns (B).
    # K is taken in 64-wide chunks with a consistent permutation of K inside the chunk: thread (g, tq) owns
    # physical K [16 tq, 16 tq + 16) of its two rows g and g + 8, which it reads with 16-byte loads; for
    # k16 step s its fragment columns {2tq, 2tq+1 | 2tq+8, 2tq+9} are physical K 16tq + 4s + {0,1 | 2,3}. The
    # activations in shared memory are read with the same map, so the products pair up exactly and the sum
    # over K is unchanged. A task's warps are (row blocks) x (K groups); K groups meet in shared memory.
    # ------------------------------------------------------------------------------------------------
    def mma_plan(rows: int, kc: int):
        """(row blocks, K groups, 64-K chunks per warp) of a GEMM task."""
        wr = rows // 16
        return wr, WARPS // wr, KernelSpec.chunks_per_warp(rows, kc)

    def chunk_of(warp, i: int, rows: int, kc: int, fp8: bool):
        """The 64-K chunk that a warp takes i-th. FP8: K groups take whole 128-K blocks (chunk pairs), so that
        qgmma_consume accumulates a block's four k32 steps in one set of registers before its scales apply;
        bf16: K groups interleave chunk by chunk."""
        wr, wk, _ = mma_plan(rows, kc)
        if fp8:
            return 2 * ((warp // wr) + wk * (i // 2)) + i % 2
        return (warp // wr) + wk * i

    def mma_issue(w_ptr, ldw: int, fp8: bool, row_base, k0, rows: int, kc: int, w_scale, lds_scale: int,
                  warp, lane, first: int, count: int):
        """Weight loads (and FP8 block scales) of this warp's chunks first .. first + count - 1."""
        wr, wk, _ = mma_plan(rows, kc)
        g = lane >> 2
        tq = lane & 3
        row = row_base + (warp % wr) * 16 + g
        raw = []
        scales = []
        for i in range(first, first + count):
            k_chunk = k0 + chunk_of(warp, i, rows, kc, fp8) * 64
            col = k_chunk + 16 * tq
            # what-if: no weight traffic, the mma on constants (0x38 = e4m3 1.0) -- every GEMM's, or one GEMM's
            if "weights" in WHATIF or ("router_w" in WHATIF and not fp8) or ("gu_w" in WHATIF and fp8 and ldw == H) \
                    or ("down_w" in WHATIF and fp8 and ldw == I):
                c4 = [Uint32(0x38383838)] * 4
                raw.append((c4, c4) if fp8 else (c4 + c4, c4 + c4))
                if fp8:
                    scales.append(Float32(1.0))
            elif fp8:
                lo = P.ld_nc_v4(w_ptr + Int64(row) * ldw + Int64(col))
                hi = P.ld_nc_v4(w_ptr + Int64(row + 8) * ldw + Int64(col))
                raw.append((lo, hi))
                kb = k_chunk // 128
                scales.append(P.ld_nc_f32(w_scale + Int64((row_base + (warp % wr) * 16) // 128 * lds_scale + kb) * 4))
            else:
                base = w_ptr + (Int64(row) * ldw + Int64(col)) * 2
                base8 = w_ptr + (Int64(row + 8) * ldw + Int64(col)) * 2
                raw.append((list(P.ld_nc_v4(base)) + list(P.ld_nc_v4(base + 16)),
                            list(P.ld_nc_v4(base8)) + list(P.ld_nc_v4(base8 + 16))))
        return raw, scales

    def mma_consume(acc, raw, scales, fp8: bool, rows: int, kc: int, first: int, s_act, s_as, warp, lane, zq=None):
        """acc (4 fp32: C[g][2tq], C[g][2tq+1], C[g+8][2tq], C[g+8][2tq+1]) += this warp's chunks.
        bf16 (the router): each chunk's four k16 steps form their own chain, added in chunk order afterwards --
        one chain through all chunks (16 mma.sync deep, ~0.27 us) was the router's mma phase once its weights
        were in registers (graph-mode trace, 81da92b: 0.45 us). (Issuing the k16 steps step-major over the
        chunks was measured at 0c3c4d6, when the weights still arrived late: no change, and TP1 spilled.)
        FP8 on a QGMMA build goes to qgmma_consume."""
        if fp8 and QGMMA:
            return qgmma_consume(acc, raw, scales, rows, kc, first, s_act, s_as, warp, lane, zq)
        g = lane >> 2
        tq = lane & 3
        part = []  # bf16: one accumulator chain per chunk, added to acc in chunk order at the end
        for j in range(len(raw)):
            chunk = chunk_of(warp, first + j, rows, kc, fp8)
            lo, hi = raw[j]
            d = [Float32(0.0)] * 4
            for s_ in range(4):
                b0, b1 = P.lds_v2(s_act + (g * kc + chunk * 64 + 16 * tq + 4 * s_) * 2)
                if fp8:
                    d = list(P.mma_f16(P.e4m3x2_lo_to_f16x2(lo[s_]), P.e4m3x2_lo_to_f16x2(hi[s_]),
                                       P.e4m3x2_hi_to_f16x2(lo[s_]), P.e4m3x2_hi_to_f16x2(hi[s_]),
                                       b0, b1, d[0], d[1], d[2], d[3]))
                else:
                    d = list(P.mma_bf16(lo[2 * s_], hi[2 * s_], lo[2 * s_ + 1], hi[2 * s_ + 1], b0, b1,
                                        d[0], d[1], d[2], d[3]))
            if fp8:
                # one 64-K chunk lies in one 128 x 128 weight block: fold both scales in per chunk
                kbl = chunk // 2
                sa0 = P.lds_f32(s_as + ((2 * tq) * (kc // 128) + kbl) * 4) * scales[j]
                sa1 = P.lds_f32(s_as + ((2 * tq + 1) * (kc // 128) + kbl) * 4) * scales[j]
                acc = [acc[0] + d[0] * sa0, acc[1] + d[1] * sa1, acc[2] + d[2] * sa0, acc[3] + d[3] * sa1]
            else:
                part.append(d)
        for d in part:
            acc = [acc[i] + d[i] for i in range(4)]
        return acc

    def qgmma_consume(acc, raw, scales, rows: int, kc: int, first: int, s_act, s_as, warp, lane, zq=None):
        """FP8 on the warpgroup MMA: the same per-thread weight loads as mma_issue made (16 bytes of rows g and
        g + 8 per 64-K chunk, K 16 tq .. 16 tq + 15) are the A fragments of two k32 steps: step t takes words
        2t, 2t + 1, i.e. its K slot 4 tq + j is physical K 16 tq + 8 t + j and slot 16 + 4 tq + j is
        16 tq + 8 t + 4 + j; stage_fp8_acts lays the tokens out in shared memory with the same map. A warpgroup
        is 4 row blocks of one K group (wr = 4 or 8). A chunk pair (one 128 x 128 weight block, chunk_of) runs
        as four wgmmas into one accumulator set; its block scales are folded in fp32 after the wait -- the
        tensor core only ever sums 128 products, as DeepGEMM's promotion interval."""
        wr, wk, _ = mma_plan(rows, kc)
        tq = lane & 3
        assert len(raw) % 2 == 0 and first % 2 == 0
        P.wgmma_fence()
        # Step-major: the chunk pairs' first k32 steps, then their second ones, ... so that consecutive wgmmas
        # write different accumulators. Measured against chain-major order (session 19, H200): EP8 even, TP1
        # -0.1..-0.25 us. The tensor core pipelines a wgmma behind the one it accumulates on; at N = 8 each costs
        # ~17.5 clocks with A from registers (~23 from shared memory: scripts/diag_wgmma.py, session 27), i.e.
        # ~0.28 us per 64 KB of weights per SM; the traces' ~0.45 us phases add the folds and the K groups' reduction.
        accs = [[Float32(0.0)] * 4 for _ in range(0, len(raw), 2)]
        for step in range(4):
            h, t = step // 2, step % 2
            for c, j in enumerate(range(0, len(raw), 2)):
                chunk = chunk_of(warp, first + j + h, rows, kc, True)
                lo, hi = raw[j + h]
                desc = P.wgmma_desc(s_act + (chunk * 2 + t) * P.WGMMA_B_STEP)
                quad = [lo[2 * t], hi[2 * t], lo[2 * t + 1], hi[2 * t + 1]]
                if zq is not None:
                    # The A quad mixes two weight rows (lo, hi), so no 16-byte load lands in one: ptxas copies the
                    # loaded registers into the quads with moves placed right behind the loads, and a move waits for
                    # its load -- the task's wait and input loads then follow the weights' round trip. Built here
                    # by adds of a runtime zero, the quads are defined right before the wgmma instead (quad_zero).
                    quad = [P.add_u32(x, zq) for x in quad]
                accs[c] = P.wgmma_e4m3(quad[0], quad[1], quad[2], quad[3], desc, accs[c], step > 0)
        ds = [v for d in accs for v in d]
        P.wgmma_commit()
        ds = P.wgmma_wait(ds)
        for j in range(0, len(raw), 2):
            d = ds[2 * j: 2 * j + 4]
            kbl = chunk_of(warp, first + j, rows, kc, True) // 2
            sa0 = P.lds_f32(s_as + ((2 * tq) * (kc // 128) + kbl) * 4) * scales[j]
            sa1 = P.lds_f32(s_as + ((2 * tq + 1) * (kc // 128) + kbl) * 4) * scales[j]
            acc = [acc[0] + d[0] * sa0, acc[1] + d[1] * sa1, acc[2] + d[2] * sa0, acc[3] + d[3] * sa1]
        return acc

    def mma_reduce(acc, rows: int, kc: int, s_red, warp, lane, tid):
        """Sum the K groups' tiles in a fixed order. Returns [(row, token, value)] for this thread."""
        wr, wk, _ = mma_plan(rows, kc)
        g = lane >> 2
        tq = lane & 3
        r0 = (warp % wr) * 16 + g
        base = (warp // wr) * rows
        P.sts_f32(s_red + ((base + r0) * 8 + 2 * tq) * 4, acc[0])
        P.sts_f32(s_red + ((base + r0) * 8 + 2 * tq + 1) * 4, acc[1])
        P.sts_f32(s_red + ((base + r0 + 8) * 8 + 2 * tq) * 4, acc[2])
        P.sts_f32(s_red + ((base + r0 + 8) * 8 + 2 * tq + 1) * 4, acc[3])
        cute.arch.sync_threads()
        outs = []
        for i in range((rows * 8 + THREADS - 1) // THREADS):
            idx = tid + THREADS * i
            r = idx >> 3
            n = idx & 7
            v = Float32(0.0)
            for k in range(wk):
                v = v + P.lds_f32(s_red + ((k * rows + r) * 8 + n) * 4)
            outs.append((r, n, v))
        return outs

    def mma_task(w_ptr, ldw: int, fp8: bool, row_base, k0, rows: int, kc: int, w_scale, lds_scale: int,
                 s_act, s_as, s_red, warp, lane, tid, raw0, sc0, batch: int, zq=None):
        """Finish a GEMM task whose first ``batch`` chunks of weight loads were issued before the wait."""
        _, _, per_warp = mma_plan(rows, kc)
        acc = [Float32(0.0)] * 4
        acc = mma_consume(acc, raw0, sc0, fp8, rows, kc, 0, s_act, s_as, warp, lane, zq)
        for first in range(batch, per_warp, batch):
            raw, sc = mma_issue(w_ptr, ldw, fp8, row_base, k0, rows, kc, w_scale, lds_scale, warp, lane, first,
                                min(batch, per_warp - first))
            acc = mma_consume(acc, raw, sc, fp8, rows, kc, first, s_act, s_as, warp, lane, zq)
        return mma_reduce(acc, rows, kc, s_red, warp, lane, tid)

    def quad_zero(tile):
        """A zero that ptxas cannot prove (the task's tile, read from shared memory, is never negative), for the adds
        that build the wgmma quads late (qgmma_consume), where the task's inputs come through counters: H200, session
        25, EP8 M = 6 / 7 / 8 -0.0..-0.23 / -0.2..-0.37 / -0.07..-0.15 us (five rounds, two calls). None -- the moves
        right behind the weight loads, which hold the task until its weights are in -- where its inputs flag
        themselves (FLAGS: EP8 M <= 5, TP1): the polls that then went out beside the weights came back behind them,
        round after round (EP8 M = 1..5 +0.8..+1.5 us, TP1 +0.3..+1.0)."""
        if cutlass.const_expr(FLAGS):
            return None
        return P.sel_i32(tile < 0, 1, 0)

    def mma_batch(rows: int, kc: int, fp8: bool) -> int:
        """Chunks per load batch: at most 128 registers of weights in flight per thread (a whole task's weights
        for every tile of both presets: the router's 4 chunks, TP8's 8, TP1's 16 -- 128 KB per CTA on TP1, where
        64-register batches left each CTA computing with nothing in flight: 57b4106, 8c7d4e3)."""
        _, _, per_warp = mma_plan(rows, kc)
        return max(1, min(per_warp, 128 // (8 if fp8 else 16)))

    def split_k_tile(tile, splits: int, kc: int, rows: int):
        """A split-K GEMM task's (K split, first K column, first weight row): tile = row tile x splits + split."""
        split = tile % splits
        return split, split * kc, (tile // splits) * rows

    B_ROUTER = mma_batch(S.router_rows, S.router_kc, False)
    B_GU = mma_batch(S.gu_rows, S.gu_kc, True)
    B_DOWN = mma_batch(S.down_rows, S.inter, True)

    # ------------------------------------------------------------------------------------------------
    # waiting for a task's inputs: thread 0 spins on the counter named in the task row, then the CTA syncs
    # ------------------------------------------------------------------------------------------------
    @cute.jit
    def static_count(grid: Int32) -> Int32:
        """KernelSpec.n_static: CTA b < this starts on task b without a ticket (TP8: up to the route)."""
        return P.sel_i32(grid < min(NT, STATIC_CAP), grid, Int32(min(NT, STATIC_CAP)))

    @cute.jit
    def exit_free_count(grid: Int32) -> Int32:
        """plan.exit_free_tasks: the CTAs that leave after a terminal task from the queue, without a last ticket
        (each such task's CTA leaves after it), unless they would be the whole grid."""
        n_static = static_count(grid)
        n = Int32(NT) - P.sel_i32(n_static > D_FIRST, n_static, Int32(D_FIRST)) + P.sel_i32(n_static <= R_IDX, 1, 0)
        return P.sel_i32(n < grid, n, 0)

    @cute.jit
    def learn_launch(t64: Int64, si: Int32):
        """Thread 0: this launch's number and first ticket from any ticket-counter value seen during it. A launch
        moves the counter by exactly per_launch (plan.tickets_per_launch) and a launch
        starts after the previous one is complete, so every value a CTA of launch L sees before taking its own
        last ticket lies in [L * per_launch, (L + 1) * per_launch)."""
        grid = cute.arch.grid_dim()[0]
        n_static = static_count(grid)
        per_launch = Int64(NT) - Int64(n_static) + Int64(grid) - Int64(exit_free_count(grid))  # plan's
        launch_no = t64 // per_launch
        P.sts_u64(si + (SI_TASK + T_WINDOW) * 4, launch_no * per_launch)
        P.sts_b32(si + (SI_TASK + T_LAUNCH) * 4, Int32(launch_no))  # mod 2^32, like the counters
        P.sts_b32(si + (SI_TASK + T_KNOWN) * 4, Int32(1))

    @cute.jit
    def ticket_index(t64: Int64, si: Int32) -> Int32:
        """A ticket-counter value as this launch's ticket number (learn_launch has run)."""
        return Int32(t64 - P.lds_u64(si + (SI_TASK + T_WINDOW) * 4))

    @cute.jit
    def take_ticket(ws: Int64, si: Int32) -> Int32:
        """Thread 0: the next queue ticket of this launch, counted from the first task after the static ones."""
        P.griddep_wait()  # the ticket counter was last written by the previous launch
        stamp_wait(si)
        t64 = P.atom_add_relaxed_u64(ws + WS_HEAD * 4, Int64(1))  # relaxed: data is ordered by the counters
        if P.lds_b32(si + (SI_TASK + T_KNOWN) * 4) == 0:
            learn_launch(t64, si)
        return ticket_index(t64, si)

    @cute.jit
    def stamp_wait(si: Int32):
        """(What-if "stamps") thread 0: when this CTA's first griddepcontrol.wait returned (later ones keep it)."""
        if cutlass.const_expr(STAMPS):
            if cute.arch.thread_idx()[0] == 0:
                if P.lds_u64(si + SI_WAIT_T * 4) == Int64(0):
                    P.sts_u64(si + SI_WAIT_T * 4, P.globaltimer())

    @cute.jit
    def griddep_if_first(waits: Int32, si: Int32):
        """A CTA's first task (waits == FIRST_TASK) starts before the previous kernel has finished (PDL): it calls
        griddepcontrol.wait before it reads anything that kernel writes or writes anything it reads. Later tasks
        come after it. (Inside a branch on purpose: in straight-line code ptxas hoisted the wait above the
        task's weight loads, so that they only went out after the previous kernel had finished -- ec53080.)"""
        if waits == FIRST_TASK:
            P.griddep_wait()
            stamp_wait(si)

    @cute.jit
    def next_ticket_early(waits: Int32, ws: Int64, si: Int32, tid: Int32) -> Int64:
        """Thread 0 of a terminal task (route, down), shortly before its last stores: the atomic for the CTA's
        next ticket, so that its round trip overlaps the stores instead of following the task -- the last
        CTA's exit (and with it the next kernel's griddepcontrol.wait) no longer waits for it. Late in the task
        on purpose: a ticket taken early binds the next task to a CTA that is still busy (81da92b)."""
        t64 = Int64(-1)
        if waits != 0 and tid == 0:
            if P.lds_b32(si + (SI_TASK + T_NEXT) * 4) < 0:  # (EXIT_NOW: this CTA leaves after the task, no ticket)
                t64 = P.atom_add_relaxed_u64(ws + WS_HEAD * 4, Int64(1))
        return t64

    @cute.jit
    def keep_next_ticket(t64: Int64, waits: Int32, si: Int32, tid: Int32):
        """... and after the stores: the ticket, for the queue loop (the launch window is known by now: the task
        has waited)."""
        if waits != 0 and tid == 0:
            if P.lds_b32(si + (SI_TASK + T_NEXT) * 4) < 0:
                P.sts_b32(si + (SI_TASK + T_NEXT) * 4, ticket_index(t64, si))

    @cute.jit
    def launch_parity(si: Int32, flagged: cutlass.Constexpr = FLAGS) -> Int32:
        """Which of the two blocks this launch's flagged data (and fixed-point sums) use: the launch number's lowest
        bit, once the CTA knows it. Where the area does not flag itself (flagged: FLAGS for the norm's outputs, the
        gate_up partials and the fixed-point sums; RFLAGS for the router partials, which flag themselves at TP8
        M >= 6 too) block 0 only (the counters order its reuse)."""
        p = Int32(0)
        if cutlass.const_expr(flagged):
            p = P.lds_b32(si + (SI_TASK + T_LAUNCH) * 4) & 1
        return p

    @cute.jit
    def prefetch_after_weights(waits: Int32, si: Int32, tid: Int32):
        """Thread 0 of a CTA's first GEMM task, its weight loads issued: the CTA's slice of the shared expert's L2
        prefetch (the prologue chose it), behind this task's own weights rather than ahead of them."""
        if waits == FIRST_TASK and tid == 0:
            k = P.lds_b32(si + SI_PF * 4)
            if k >= 0:
                n_pf = P.lds_b32(si + (SI_PF + 1) * 4)
                if cutlass.const_expr("gu_w" not in WHATIF):
                    prefetch_slice(P.lds_u64(si + (SI_PF + 2) * 4), 2 * I * H, k, n_pf)
                if cutlass.const_expr("down_w" not in WHATIF):
                    prefetch_slice(P.lds_u64(si + (SI_PF + 4) * 4), H * I, k, n_pf)

    @cute.jit
    def record_wait_failure(wc: Int32, seen: Int32, target: Int32, ws: Int64, si: Int32):
        """A dependency never arrived: give up (never hang the GPU), record the first failure in the workspace and
        in the host-mapped record that megapre.run checks before its next launch."""
        task = P.lds_b32(si + SI_TASK * 4)
        if P.atom_cas(ws + WS_ERROR * 4, Int32(0), task + 1) == 0:
            rec = P.ld_b64(ws + WS_ERRPTR * 4)
            if rec != 0:
                P.st_sys_b32(rec + 4, P.lds_b32(si + (SI_TASK + 1) * 4))
                P.st_sys_b32(rec + 8, P.lds_b32(si + (SI_TASK + 2) * 4))
                P.st_sys_b32(rec + 12, wc)
                P.st_sys_b32(rec + 16, seen)
                P.st_sys_b32(rec + 20, target)
                P.fence_sys()
                P.st_sys_b32(rec, task + 1)

    @cute.jit
    def poll_counter(wc: Int32, target: Int32, ws: Int64, si: Int32) -> Int32:
        """Thread 0, launch number known: spin until this launch's signals on counter wc reach target (acquire);
        returns the count seen (below target: the wait gave up and recorded the failure)."""
        addr = ws + WS_COUNTERS * 4 + Int64(wc) * 4
        # the counter holds (earlier launches) x (its stage's tiles) + this launch's signals
        tiles_per_launch = Int32(0)
        for c in cutlass.range_constexpr(N_COUNTERS):
            tiles_per_launch = tiles_per_launch + P.sel_i32(wc == c, Int32(TILES[c]), 0)
        base = P.lds_b32(si + (SI_TASK + T_LAUNCH) * 4) * tiles_per_launch
        seen = P.ld_acquire(addr) - base
        spins = Int32(0)
        while seen < target and spins < SPIN_LIMIT:
            if spins >= HOT_SPINS:
                P.nanosleep(100)
            seen = P.ld_acquire(addr) - base
            spins = spins + 1
        if cutlass.const_expr(not FLAGS):
            if wc == NORM and seen >= target and target == NORM_TASKS:
                P.sts_b32(si + (SI_TASK + T_NORM_SEEN) * 4, Int32(1))  # (the counters only grow in a launch)
        if seen < target:
            record_wait_failure(wc, seen, target, ws, si)
        return seen

    @cute.jit
    def wait_ready(waits: Int32, ws: Int64, si: Int32, tid: Int32):
        griddep_if_first(waits, si)
        if waits != 0 and tid == 0:
            if P.lds_b32(si + (SI_TASK + T_KNOWN) * 4) == 0:
                # a static first task: the launch number from a plain read of the ticket counter (taking a
                # ticket here would tie this CTA's next task to it before it is free: measured at 81da92b, the
                # route CTA then held a gate_up task until 9 us at M = 8)
                learn_launch(P.ld_relaxed_u64(ws + WS_HEAD * 4), si)
            wc = P.lds_b32(si + (SI_TASK + 3) * 4)
            if wc >= 0:
                poll_counter(wc, P.lds_b32(si + (SI_TASK + 4) * 4), ws, si)
            if cutlass.const_expr(S.trace):
                P.sts_u64(si + (SI_TASK + T_READY) * 4, P.globaltimer())
        cute.arch.sync_threads()

    @cute.jit
    def stamp(stage: cutlass.Constexpr, slot: cutlass.Constexpr, tile: Int32, ws: Int64, tid: Int32):
        """Trace builds: thread 0 of the stage's tile 0 records when it passed point ``slot`` of the stage, and
        every task its first TRACE_POINTS points, in its own trace record (fused.read_trace)."""
        if cutlass.const_expr(S.trace):
            if tid == 0 and tile == 0:
                P.st_u64(ws + OFF_PH + Int64(stage * PHASE_SLOTS + slot) * 8, P.globaltimer())
            if cutlass.const_expr(slot < TRACE_POINTS and stage in FIRST_ROW):
                if tid == 0 and tile >= 0:  # (the route's warm-up pass stamps tile -1)
                    P.st_u64(trace_word(stage, tile, ws, 4 + slot), P.globaltimer())

    @cute.jit
    def trace_retries(stage: cutlass.Constexpr, tile: Int32, spins: Int32, ws: Int64, tid: Int32):
        """Trace builds: how many rounds of the task's poll of flagged data came back with a sentinel."""
        if cutlass.const_expr(S.trace and stage in FIRST_ROW):
            if tid == 0 and tile >= 0:
                P.st_u64(trace_word(stage, tile, ws, TRACE_RETRIES), Int64(spins))

    def trace_word(stage: int, tile: Int32, ws: Int64, k: int) -> Int64:
        """Address of int64 k of the trace record of the stage's task `tile` (plan.TRACE_INTS per task)."""
        return ws + OFF_TR + Int64(FIRST_ROW[stage] + tile) * (TRACE_INTS * 8) + k * 8

    # ------------------------------------------------------------------------------------------------
    # L2 prefetch: at kernel start every CTA asks for its slice of every weight matrix, so the whole
    # weight stream is in flight from the first cycle, not only when the task that reads it starts
    # ------------------------------------------------------------------------------------------------
    @cute.jit
    def prefetch_slice(base: Int64, nbytes: cutlass.Constexpr, bid: Int32, nblk: Int32):
        chunk = (Int32(nbytes) + nblk * 16 - 1) // (nblk * 16) * 16
        start = bid * chunk
        if start < nbytes:
            size = P.sel_i32(start + chunk <= nbytes, chunk, Int32(nbytes) - start)
            P.prefetch_l2_bulk(base + Int64(start), size)

    # ------------------------------------------------------------------------------------------------
    # stage: router GEMM partials (bf16 x bf16 -> fp32)
    # ------------------------------------------------------------------------------------------------
    @cute.jit
    def stage_router_x(xb: Int64, k0: Int32, kc: cutlass.Constexpr, sf: Int32, tid: Int32) -> Int32:
        """This thread's share of x[:, k0:k0+kc] into shared memory; 1 if a word of it was still the sentinel."""
        nvec = 8 * kc // 8
        bad = Int32(0)
        for i in cutlass.range_constexpr((nvec + THREADS - 1) // THREADS):
            v = tid + i * THREADS
            if v < nvec:
                m = v // (kc // 8)
                kk = (v % (kc // 8)) * 8
                if m < M:
                    if cutlass.const_expr(FLAGS):
                        u0, u1, u2, u3 = P.ld_relaxed_v4(xb + Int64(m * H + k0 + kk) * 2)
                    else:
                        u0, u1, u2, u3 = P.ld_cg_v4(xb + Int64(m * H + k0 + kk) * 2)
                    P.sts_v4(sf + S_ACT + (m * kc + kk) * 2, u0, u1, u2, u3)
                    if cutlass.const_expr(FLAGS):
                        bad = bad | is_sentinel4(u0, u1, u2, u3)
                else:
                    P.sts_v4(sf + S_ACT + (m * kc + kk) * 2, Uint32(0), Uint32(0), Uint32(0), Uint32(0))
        return bad

    @cute.jit
    def is_sentinel4(u0: Uint32, u1: Uint32, u2: Uint32, u3: Uint32) -> Int32:
        return (P.sel_i32(Int32(u0) == SENT, 1, 0) | P.sel_i32(Int32(u1) == SENT, 1, 0)
                | P.sel_i32(Int32(u2) == SENT, 1, 0) | P.sel_i32(Int32(u3) == SENT, 1, 0))

    @cute.jit
    def stage_router(tile: Int32, gate_w: Int64, ws: Int64, sf: Int32, si: Int32, tid: Int32, waits: Int32):
        if cutlass.const_expr("gemm" in WHATIF):
            wait_ready(waits, ws, si, tid)
            return
        warp, lane = tid >> 5, tid & 31
        kc = S.router_kc
        split, k0, row_base = split_k_tile(tile, S.router_splits, kc, S.router_rows)
        raw0, sc0 = mma_issue(gate_w, H, False, row_base, k0, S.router_rows, kc, gate_w, 0, warp, lane, 0, B_ROUTER)
        prefetch_after_weights(waits, si, tid)
        wait_ready(waits, ws, si, tid)
        stamp(ROUTER, 0, tile, ws, tid)
        # stage x[:, k0:k0+kc] (bf16) for 8 token rows, zeros past M; with flagged data, until no word of it is the
        # sentinel (the norm has written it)
        xb = ws + OFF_X + Int64(launch_parity(si) * XB)
        if cutlass.const_expr(not FLAGS):
            stage_router_x(xb, k0, kc, sf, tid)
            cute.arch.sync_threads()
        else:
            again = P.syncthreads_or(stage_router_x(xb, k0, kc, sf, tid))
            spins = Int32(0)
            while again != 0 and spins < SPIN_LIMIT:
                if spins >= HOT_SPINS:
                    P.nanosleep(100)
                again = P.syncthreads_or(stage_router_x(xb, k0, kc, sf, tid))
                spins = spins + 1
            if again != 0 and tid == 0:
                record_wait_failure(Int32(NORM), Int32(0), Int32(1), ws, si)
            trace_retries(ROUTER, tile, spins, ws, tid)
        stamp(ROUTER, 1, tile, ws, tid)
        outs = mma_task(gate_w, H, False, row_base, k0, S.router_rows, kc, gate_w, 0, sf + S_ACT, sf + S_AS,
                        sf + S_RED, warp, lane, tid, raw0, sc0, B_ROUTER)
        stamp(ROUTER, 2, tile, ws, tid)
        rp_p = launch_parity(si, RFLAGS)
        for r, n, val in outs:
            if n < M:
                if cutlass.const_expr(RFLAGS):
                    off = Int64((split * M + n) * E + row_base + r) * 4
                    store_flagged_f32(ws + OFF_RP + off, RPB, rp_p, val)
                else:
                    P.st_f32(ws + OFF_RP + Int64((split * M + n) * E + row_base + r) * 4, val)

    # ------------------------------------------------------------------------------------------------
    # stage: shared expert gate_up GEMM partials (block-scaled FP8)
    # ------------------------------------------------------------------------------------------------
    @cute.jit
    def stage_fp8_acts(src: Int64, src_scale: Int64, ld_src: cutlass.Constexpr, ld_scale: cutlass.Constexpr,
                       k0: Int32, kc: cutlass.Constexpr, sf: Int32, tid: Int32):
        """Stage FP8 activations src[m, k0:k0+kc] for 8 token rows (zeros past M) -- e4m3 bytes in the wgmma B
        layout (qgmma) or f16 codes (hmma, exact) -- and their per-128 scales, applied per chunk after the
        tensor-core products."""
        codes, scales = fp8_acts_load(src, src_scale, ld_src, ld_scale, k0, kc, tid)
        fp8_acts_store(codes, scales, kc, sf)

    @cute.jit
    def fp8_acts_load(src: Int64, src_scale: Int64, ld_src: cutlass.Constexpr, ld_scale: cutlass.Constexpr,
                      k0: Int32, kc: cutlass.Constexpr, tid: Int32, flagged: cutlass.Constexpr = False):
        """stage_fp8_acts' global loads (this thread's codes and scales), all issued before any shared store: a
        store waits for its load, and a load issued after it (the scales) made a second L2 round trip (SASS at
        7f71df0: gate_up's "a_q staged" 0.58 us against the router's one-trip 0.2)."""
        nvec = 8 * kc // 8
        nsc = 8 * (kc // 128)
        codes = []
        for i in cutlass.range_constexpr((nvec + THREADS - 1) // THREADS):
            v = tid + i * THREADS
            m = v // (kc // 8)
            kk = (v % (kc // 8)) * 8
            q0 = Uint32(0)
            q1 = Uint32(0)
            if m < M:  # (v >= nvec gives m >= 8 >= M: no load)
                if cutlass.const_expr(flagged):
                    q0, q1 = P.ld_relaxed_v2(src + Int64(m * ld_src + k0 + kk))
                else:
                    q0, q1 = P.ld_cg_v2(src + Int64(m * ld_src + k0 + kk))
            codes.append((v, kk, m, q0, q1))
        scales = []
        for i in cutlass.range_constexpr((nsc + THREADS - 1) // THREADS):
            v = tid + i * THREADS
            m = v // (kc // 128)
            kb = v % (kc // 128)
            sc = Float32(0.0)
            if m < M:  # (v >= nsc gives m >= 8)
                if cutlass.const_expr(flagged):
                    sc = P.ld_relaxed_f32(src_scale + Int64(m * ld_scale + k0 // 128 + kb) * 4)
                else:
                    sc = P.ld_cg_f32(src_scale + Int64(m * ld_scale + k0 // 128 + kb) * 4)
            scales.append((v, sc))
        return codes, scales

    def fp8_acts_store(codes, scales, kc: int, sf):
        """stage_fp8_acts' shared stores of what fp8_acts_load returned."""
        for v, kk, m, q0, q1 in codes:
            store_act_code(v, kk, m, q0, q1, kc, sf)
        for v, sc in scales:
            store_act_scale(v, sc, kc, sf)

    def act_word(sf, k, m):
        """Shared address of token m's 4 e4m3 codes at physical K k .. k + 3 (k % 4 == 0) in the wgmma B layout
        (qgmma_consume): a thread's 16-byte weight run tq = (k % 64) // 16 of 64-K chunk k // 64 holds words
        w = (k % 16) // 4; word w is k32 step w // 2 of the chunk, core matrix w % 2 (128 bytes on), token row m."""
        w = (k % 16) // 4
        return sf + S_ACT + ((k // 64) * 2 + w // 2) * P.WGMMA_B_STEP + (w % 2) * 128 + m * 16 + 4 * ((k % 64) // 16)

    @cute.jit
    def store_act_code(v: Int32, kk: Int32, m: Int32, q0: Uint32, q1: Uint32, kc: cutlass.Constexpr, sf: Int32):
        if v < 8 * kc // 8:
            if cutlass.const_expr(QGMMA):
                # e4m3 bytes in the wgmma B layout: kk % 8 == 0, so bytes 0-3 are an even word and bytes 4-7 the
                # odd word after it, the next core matrix of the same k32 step
                dst = act_word(sf, kk, m)
                P.sts_b32(dst, Int32(q0))
                P.sts_b32(dst + 128, Int32(q1))
            else:  # exact f16 codes (zero codes past M give zeros)
                P.sts_v4(sf + S_ACT + (m * kc + kk) * 2, P.e4m3x2_lo_to_f16x2(q0), P.e4m3x2_hi_to_f16x2(q0),
                         P.e4m3x2_lo_to_f16x2(q1), P.e4m3x2_hi_to_f16x2(q1))

    @cute.jit
    def store_act_scale(v: Int32, sc: Float32, kc: cutlass.Constexpr, sf: Int32):
        if v < 8 * (kc // 128):
            P.sts_f32(sf + S_AS + v * 4, sc)

    def fp8_acts_bad(codes, scales) -> Int32:
        """1 if a word that fp8_acts_load loaded is still the sentinel (flagged data not yet written)."""
        bad = Int32(0)
        for _v, _kk, _m, q0, q1 in codes:
            bad = bad | P.sel_i32(Int32(q0) == SENT, 1, 0) | P.sel_i32(Int32(q1) == SENT, 1, 0)
        for _v, sc in scales:
            bad = bad | P.sel_i32(P.f32_as_i32(sc) == SENT, 1, 0)
        return bad

    # Counter builds (not norm_flags): the residual output, in the queue, comes from the gate_up tasks -- each writes
    # GU_RES columns of its K chunk (its row tile's share) for every token. A gate_up task starts after every norm task
    # has finished, so after every read of the residual input -- which out.residual may be (an in-place update).
    # Loaded with the task's a_q, stored once the tokens are staged (the stores drain during the mma).
    GU_RES = S.gu_kc // (2 * I // S.gu_rows)  # columns per gate_up task (TP8: 128, TP1: 32)

    @cute.jit
    def gate_up_residual_load(k0: Int32, row_base: Int32, hidden: Int64, residual: Int64, tid: Int32):
        """This thread's 4 columns (token tid // (GU_RES / 4)): (byte offset, the packed hidden and residual
        values; zeros for a thread past the tokens)."""
        L = GU_RES // 4  # threads per token (4 columns each)
        m = tid // L
        off = Int64(m * H + k0 + (row_base // S.gu_rows) * GU_RES + (tid - m * L) * 4) * 2
        h0 = Uint32(0)
        h1 = Uint32(0)
        r0 = Uint32(0)
        r1 = Uint32(0)
        if m < M:
            h0, h1 = P.ld_cg_v2(hidden + off)
            r0, r1 = P.ld_cg_v2(residual + off)
        return off, h0, h1, r0, r1

    @cute.jit
    def gate_up_residual_store(off: Int64, h0: Uint32, h1: Uint32, r0: Uint32, r1: Uint32, o_res: Int64, tid: Int32):
        """... and its store: residual = bf16(hidden + residual), as the norm computes it."""
        if tid // (GU_RES // 4) < M:
            v = residual_add(h0, h1, r0, r1)
            P.st_v2(o_res + off, P.f32x2_to_bf16x2(v[0], v[1]), P.f32x2_to_bf16x2(v[2], v[3]))

    def gate_up_tokens(o_aq: Int64, o_as: Int64, ws: Int64, si: Int32):
        """Where a gate_up task reads a_q / a_scale: this launch's flagged copies, or (counters) the outputs."""
        if cutlass.const_expr(FLAGS):
            p = launch_parity(si)
            return ws + OFF_AQC + Int64(p * AQB), ws + OFF_ASC + Int64(p * ASB)
        return o_aq, o_as

    @cute.jit
    def stage_gate_up(tile: Int32, hidden: Int64, residual: Int64, o_res: Int64, o_aq: Int64, o_as: Int64, w13: Int64,
                      w13_s: Int64, ws: Int64, sf: Int32, si: Int32, tid: Int32, waits: Int32):
        if cutlass.const_expr("gemm" in WHATIF):
            wait_ready(waits, ws, si, tid)
            return
        # A CTA's later task loads its a_q slice first, then the weights, so that the tokens are in shared memory
        # when the weights land: with flagged data always (the check after the loads says whether the norm had
        # written them); with the counters once its CTA has seen every norm task done (an earlier wait of this
        # launch). Otherwise the weights go first (before the previous kernel has finished, for a CTA's first
        # task) and the tokens follow the wait.
        if cutlass.const_expr(FLAGS):
            if waits == 1:
                gate_up_task(tile, hidden, residual, o_res, o_aq, o_as, w13, w13_s, ws, sf, si, tid, waits, True)
            else:
                gate_up_task(tile, hidden, residual, o_res, o_aq, o_as, w13, w13_s, ws, sf, si, tid, waits, False)
        else:
            if waits == 1 and P.lds_b32(si + (SI_TASK + T_NORM_AT_START) * 4) != 0:
                gate_up_task(tile, hidden, residual, o_res, o_aq, o_as, w13, w13_s, ws, sf, si, tid, waits, True)
            else:
                gate_up_task(tile, hidden, residual, o_res, o_aq, o_as, w13, w13_s, ws, sf, si, tid, waits, False)

    @cute.jit
    def gate_up_task(tile: Int32, hidden: Int64, residual: Int64, o_res: Int64, o_aq: Int64, o_as: Int64, w13: Int64,
                     w13_s: Int64, ws: Int64, sf: Int32, si: Int32, tid: Int32, waits: Int32,
                     acts_first: cutlass.Constexpr):
        warp, lane = tid >> 5, tid & 31
        kc = S.gu_kc
        split, k0, row_base = split_k_tile(tile, S.gu_splits, kc, S.gu_rows)
        if cutlass.const_expr(acts_first):
            aq, asc = gate_up_tokens(o_aq, o_as, ws, si)
            codes, scales = fp8_acts_load(aq, asc, H, NG, k0, kc, tid, FLAGS)
            if cutlass.const_expr(not FLAGS):
                res = gate_up_residual_load(k0, row_base, hidden, residual, tid)
            raw0, sc0 = mma_issue(w13, H, True, row_base, k0, S.gu_rows, kc, w13_s, NG, warp, lane, 0, B_GU)
            stamp(GATE_UP, 0, tile, ws, tid)
            fp8_acts_store(codes, scales, kc, sf)
        else:
            raw0, sc0 = mma_issue(w13, H, True, row_base, k0, S.gu_rows, kc, w13_s, NG, warp, lane, 0, B_GU)
            prefetch_after_weights(waits, si, tid)
            wait_ready(waits, ws, si, tid)
            stamp(GATE_UP, 0, tile, ws, tid)
            aq, asc = gate_up_tokens(o_aq, o_as, ws, si)
            codes, scales = fp8_acts_load(aq, asc, H, NG, k0, kc, tid, FLAGS)
            if cutlass.const_expr(not FLAGS):
                res = gate_up_residual_load(k0, row_base, hidden, residual, tid)
            fp8_acts_store(codes, scales, kc, sf)
        if cutlass.const_expr(not FLAGS):
            if waits != 0:  # (run alone, the norm stage writes it)
                gate_up_residual_store(res[0], res[1], res[2], res[3], res[4], o_res, tid)
        if cutlass.const_expr(QGMMA):
            P.fence_proxy_async_smem()  # the tokens are read by wgmma (async proxy)
        if cutlass.const_expr(not FLAGS):
            cute.arch.sync_threads()
        else:
            again = P.syncthreads_or(fp8_acts_bad(codes, scales))
            # the norm had not written all of this K chunk yet: load it again until it has
            spins = Int32(0)
            while again != 0 and spins < SPIN_LIMIT:
                if spins >= HOT_SPINS:
                    P.nanosleep(100)
                codes2, scales2 = fp8_acts_load(aq, asc, H, NG, k0, kc, tid, True)
                fp8_acts_store(codes2, scales2, kc, sf)
                bad2 = fp8_acts_bad(codes2, scales2)
                if cutlass.const_expr(QGMMA):
                    P.fence_proxy_async_smem()
                again = P.syncthreads_or(bad2)
                spins = spins + 1
            if again != 0 and tid == 0:
                record_wait_failure(Int32(NORM), Int32(0), Int32(1), ws, si)
            trace_retries(GATE_UP, tile, spins, ws, tid)
        stamp(GATE_UP, 1, tile, ws, tid)
        gu_p = launch_parity(si)  # (this launch's block of the fixed-point sums, and with DFLAGS of the partials)
        gx = ws + Int64(gu_p * GXB)
        outs = mma_task(w13, H, True, row_base, k0, S.gu_rows, kc, w13_s, NG, sf + S_ACT, sf + S_AS, sf + S_RED,
                        warp, lane, tid, raw0, sc0, B_GU, quad_zero(tile))
        stamp(GATE_UP, 2, tile, ws, tid)
        for r, n, val in outs:
            if n < M:
                # the fp32 partial, and (KernelSpec.gu_fixed) its share of the fixed-point sum, which the act
                # reads instead: 8 bytes per element instead of 4 per split (M = 8: 32 KB per down task's act
                # instead of 114 KB, every down task reading it at once); the fp32 partials are then read only for
                # a flagged token
                if cutlass.const_expr(DFLAGS):
                    off = Int64((split * M + n) * 2 * I + row_base + r) * 4
                    store_flagged_f32(ws + OFF_GU + off, GUB, gu_p, val)
                else:
                    P.st_f32(ws + OFF_GU + Int64((split * M + n) * 2 * I + row_base + r) * 4, val)
                if cutlass.const_expr(GU_FIXED):
                    if P.fabs(val) < GU_FIX_LIMIT:  # (false for NaN)
                        P.red_add_u64(gx + OFF_GX + Int64(n * 2 * I + row_base + r) * 8, P.f32_to_fixed(val))
                    else:
                        P.red_or_b32(gx + OFF_GXF + Int64(n) * 4, Int32(1))

    # ------------------------------------------------------------------------------------------------
    # stage: SiLU-and-mul + FP8 quantization of one 128-column group of h
    # ------------------------------------------------------------------------------------------------
    @cute.jit
    def act_split_sums(m: Int32, c: Int32, gu: Int64, flagged: cutlass.Constexpr):
        """Token m, gate and up columns c .. c + 3: the fp32 split partials of block gu summed in split order, and
        (flagged: DFLAGS) 1 if a loaded word was still the sentinel -- every load is issued before any check."""
        g0, g1, g2, g3 = Float32(0.0), Float32(0.0), Float32(0.0), Float32(0.0)
        u0, u1, u2, u3 = Float32(0.0), Float32(0.0), Float32(0.0), Float32(0.0)
        bad = Int32(0)
        for s in cutlass.range_constexpr(S.gu_splits):
            base = gu + Int64((s * M + m) * 2 * I + c) * 4
            if cutlass.const_expr(flagged):
                a0, a1, a2, a3 = P.ld_relaxed_v4f(base)
                b0, b1, b2, b3 = P.ld_relaxed_v4f(base + I * 4)
            else:
                a0, a1, a2, a3 = P.ld_cg_v4f(base)
                b0, b1, b2, b3 = P.ld_cg_v4f(base + I * 4)
            g0, g1, g2, g3 = g0 + a0, g1 + a1, g2 + a2, g3 + a3
            u0, u1, u2, u3 = u0 + b0, u1 + b1, u2 + b2, u3 + b3
            if cutlass.const_expr(flagged):
                for x in (a0, a1, a2, a3, b0, b1, b2, b3):
                    bad = bad | P.sel_i32(P.f32_as_i32(x) == SENT, 1, 0)
        return g0, g1, g2, g3, u0, u1, u2, u3, bad

    @cute.jit
    def act_sums(m: Int32, g: Int32, lane: Int32, ws: Int64, gx: Int64):
        """Token m, h columns g*128 + lane*4 .. + 3: the gate and up GEMM outputs (fp32, 4 each) from the split
        partials -- their fixed-point sums (KernelSpec.gu_fixed; gx + OFF_GX: this launch's block), or the fp32
        partials summed in split order."""
        c = g * 128 + lane * 4
        if cutlass.const_expr(not GU_FIXED):
            return act_split_sums(m, c, ws + OFF_GU, False)[:8]
        fx = gx + OFF_GX + Int64(m * 2 * I + c) * 8
        flag = P.ld_cg_b32(gx + OFF_GXF + Int64(m) * 4)
        s0, s1 = P.ld_cg_v2_u64(fx)
        s2, s3 = P.ld_cg_v2_u64(fx + 16)
        t0, t1 = P.ld_cg_v2_u64(fx + I * 8)
        t2, t3 = P.ld_cg_v2_u64(fx + I * 8 + 16)
        g0, g1, g2, g3 = P.fixed_to_f32(s0), P.fixed_to_f32(s1), P.fixed_to_f32(s2), P.fixed_to_f32(s3)
        u0, u1, u2, u3 = P.fixed_to_f32(t0), P.fixed_to_f32(t1), P.fixed_to_f32(t2), P.fixed_to_f32(t3)
        if flag != 0:
            # a partial of this token was not finite or out of the fixed-point range: the fp32 partials in split
            # order (NaN and inf as the GEMM would give them)
            g0, g1, g2, g3, u0, u1, u2, u3, _ = act_split_sums(m, c, ws + OFF_GU, False)
        return g0, g1, g2, g3, u0, u1, u2, u3

    @cute.jit
    def silu4(g0: Float32, g1: Float32, g2: Float32, g3: Float32):
        """fl32(g / (1 + e^-g)) of four bf16 values: the division on the FMA pipe where that is exact (P.div_fast),
        else -- in the whole warp, if any lane needs it (g < -41, tiny, NaN or inf) -- in double precision."""
        e0 = Float32(1.0) + P.exp_f32(-g0)
        e1 = Float32(1.0) + P.exp_f32(-g1)
        e2 = Float32(1.0) + P.exp_f32(-g2)
        e3 = Float32(1.0) + P.exp_f32(-g3)
        s0, s1, s2, s3 = P.div_fast(g0, e0), P.div_fast(g1, e1), P.div_fast(g2, e2), P.div_fast(g3, e3)
        ok = P.div_fast_ok(g0, e0) & P.div_fast_ok(g1, e1) & P.div_fast_ok(g2, e2) & P.div_fast_ok(g3, e3)
        if P.warp_any(ok == 0) != 0:
            s0, s1, s2, s3 = P.div_exact(g0, e0), P.div_exact(g1, e1), P.div_exact(g2, e2), P.div_exact(g3, e3)
        return s0, s1, s2, s3

    def act_math(v):
        """The 8 values of act_sums -> h = bf16(SiLU(bf16(gate)) * bf16(up)) with vLLM's bf16 roundings, then FP8
        quantization with the 128-group's scale (the warp's). Returns (4 e4m3 codes packed, scale)."""
        g = list(P.round_bf16x2(v[0], v[1])) + list(P.round_bf16x2(v[2], v[3]))
        u = list(P.round_bf16x2(v[4], v[5])) + list(P.round_bf16x2(v[6], v[7]))
        s0, s1, s2, s3 = silu4(g[0], g[1], g[2], g[3])
        a0, a1 = P.round_bf16x2(s0, s1)
        a2, a3 = P.round_bf16x2(s2, s3)
        h0, h1 = P.round_bf16x2(a0 * u[0], a1 * u[1])
        h2, h3 = P.round_bf16x2(a2 * u[2], a3 * u[3])
        return quant_group(h0, h1, h2, h3)

    @cute.jit
    def stage_act(g: Int32, ws: Int64, si: Int32, tid: Int32, waits: Int32):
        m = tid >> 5
        lane = tid & 31
        wait_ready(waits, ws, si, tid)
        stamp(ACT, 0, g, ws, tid)
        if cutlass.const_expr("act" in WHATIF):
            return
        if m < M:
            v = act_sums(m, g, lane, ws, ws + Int64(launch_parity(si) * GXB))
            stamp(ACT, 1, g, ws, tid)
            q, scale = act_math(v)
            P.st_b32(ws + OFF_HQ + Int64(m * I + g * 128 + lane * 4), q)
            if lane == 0:
                P.st_f32(ws + OFF_HS + Int64(m * (I // 128) + g) * 4, scale)
        stamp(ACT, 2, g, ws, tid)

    @cute.jit
    def act_to_smem(q: Uint32, scale: Float32, m: Int32, g: Int32, sf: Int32, lane: Int32):
        """A unit's codes and scale into the down GEMM's staging buffer, as stage_fp8_acts would stage them."""
        kk = g * 128 + lane * 4
        if cutlass.const_expr(QGMMA):
            P.sts_b32(act_word(sf, kk, m), Int32(q))  # the wgmma B layout
        else:
            P.sts_v2(sf + S_ACT + (m * I + kk) * 2, P.e4m3x2_lo_to_f16x2(q), P.e4m3x2_hi_to_f16x2(q))
        if lane == 0:
            P.sts_f32(sf + S_AS + (m * (I // 128) + g) * 4, scale)

    @cute.jit
    def stage_act_to_smem(ws: Int64, sf: Int32, si: Int32, tid: Int32, trace_tile: Int32):
        """Fused act (S.fuse_act): the down task computes h itself, warp u = (token u // G, group u % G), and
        stages it for the down GEMM as stage_fp8_acts would have from h_q / h_scale (rows past M zero)."""
        bad = Int32(0)
        if cutlass.const_expr("act" in WHATIF):
            return bad
        G = I // 128
        warp = tid >> 5
        lane = tid & 31
        gx = ws + Int64(launch_parity(si) * GXB)
        gu = ws + OFF_GU + Int64(launch_parity(si) * GUB)
        for r in cutlass.range_constexpr((M * G + WARPS - 1) // WARPS):
            u = warp + WARPS * r
            if cutlass.const_expr(r == 0 or (M * G) % WARPS == 0):
                if u < M * G:
                    if cutlass.const_expr(DFLAGS):
                        w = act_split_sums(u // G, (u % G) * 128 + lane * 4, gu, True)
                        v = w[:8]
                        bad = bad | w[8]
                    else:
                        v = act_sums(u // G, u % G, lane, ws, gx)
                    stamp(ACT, 1, trace_tile + r, ws, tid)
                    q, scale = act_math(v)
                    act_to_smem(q, scale, u // G, u % G, sf, lane)
            else:
                # A second unit on some warps only (M = 5 / 6 / 7): loads and math on every warp -- the ones without
                # a unit redo the last one -- and only the staging under the branch, so that ptxas can issue these
                # loads before the first unit's math (behind `if u < M * G` they waited for it: one more L2 round
                # trip at M = 5..7 than at M = 8, where the branch folds away).
                uc = P.sel_i32(u < M * G, u, Int32(M * G - 1))
                if cutlass.const_expr(DFLAGS):
                    w = act_split_sums(uc // G, (uc % G) * 128 + lane * 4, gu, True)
                    v = w[:8]
                    bad = bad | w[8]
                else:
                    v = act_sums(uc // G, uc % G, lane, ws, gx)
                stamp(ACT, 1, trace_tile + r, ws, tid)
                q, scale = act_math(v)
                if u < M * G:
                    act_to_smem(q, scale, u // G, u % G, sf, lane)
        act_zero_rows(sf, tid)
        return bad

    @cute.jit
    def act_zero_rows(sf: Int32, tid: Int32):
        """The down GEMM's staged token rows M .. 7 and their scales: zeros."""
        G = I // 128
        if cutlass.const_expr(QGMMA):
            # zero rows M .. 7: 16 bytes per (k32 step, core matrix, row)
            RZ = 8 - M
            for i in cutlass.range_constexpr(((I // 32) * 2 * RZ + THREADS - 1) // THREADS):
                v = tid + i * THREADS
                if v < (I // 32) * 2 * RZ:
                    P.sts_v4(sf + S_ACT + (v // (2 * RZ)) * P.WGMMA_B_STEP + ((v % (2 * RZ)) // RZ) * 128
                             + (M + v % RZ) * 16, Uint32(0), Uint32(0), Uint32(0), Uint32(0))
        else:
            for i in cutlass.range_constexpr(((8 - M) * I // 8 + THREADS - 1) // THREADS):  # zero rows M .. 7
                v = tid + i * THREADS
                if v < (8 - M) * I // 8:
                    P.sts_v4(sf + S_ACT + (M * I + v * 8) * 2, Uint32(0), Uint32(0), Uint32(0), Uint32(0))
        if tid < (8 - M) * G:
            P.sts_f32(sf + S_AS + (M * G + tid) * 4, Float32(0.0))

    def act_issue_flagged(gu, warp, lane):
        """(DFLAGS) The loads of every act unit of this warp (warp + 8 r), predicated off past the units: a list
        per unit of its splits' (gate, up) vectors, not yet read."""
        G = I // 128
        pend = []
        for r in range((M * G + WARPS - 1) // WARPS):
            u = warp + WARPS * r
            ok = P.sel_i32(u < M * G, 1, 0)
            uc = P.sel_i32(u < M * G, u, Int32(M * G - 1))
            c = (uc % G) * 128 + lane * 4
            vecs = []
            for s_ in range(S.gu_splits):
                base = gu + Int64((s_ * M + uc // G) * 2 * I + c) * 4
                vecs.append((P.ld_relaxed_v4f_if(base, ok), P.ld_relaxed_v4f_if(base + I * 4, ok)))
            pend.append(vecs)
        return pend

    def act_bad_flagged(pend) -> Int32:
        """1 if a word act_issue_flagged loaded was still the sentinel (the gate_up task had not written it)."""
        bad = Int32(0)
        for vecs in pend:
            for a, b in vecs:
                for x in list(a) + list(b):
                    bad = bad | P.sel_i32(P.f32_as_i32(x) == SENT, 1, 0)
        return bad

    def act_math_flagged(pend, sf, warp, lane, tid):
        """The loaded partials summed in split order, SiLU-and-mul, quantization and staging, as stage_act_to_smem."""
        for r in range(len(pend)):
            u = warp + WARPS * r
            g = [Float32(0.0)] * 4
            up = [Float32(0.0)] * 4
            for a, b in pend[r]:
                for j in range(4):
                    g[j] = g[j] + a[j]
                    up[j] = up[j] + b[j]
            q, scale = act_math(g + up)
            act_stage_if(q, scale, u, sf, lane)
        act_zero_rows(sf, tid)

    @cute.jit
    def act_stage_if(q: Uint32, scale: Float32, u: Int32, sf: Int32, lane: Int32):
        G = I // 128
        if u < M * G:
            act_to_smem(q, scale, u // G, u % G, sf, lane)

    # ------------------------------------------------------------------------------------------------
    # stage: shared expert down GEMM (block-scaled FP8) -> shared_out bf16
    # ------------------------------------------------------------------------------------------------
    @cute.jit
    def stage_down(rt: Int32, w2: Int64, w2_s: Int64, o_shared: Int64, ws: Int64, sf: Int32, si: Int32, tid: Int32,
                   waits: Int32):
        if cutlass.const_expr("gemm" in WHATIF):
            wait_ready(waits, ws, si, tid)
            return
        warp = tid >> 5
        lane = tid & 31
        row_base = rt * S.down_rows
        bad = Int32(0)
        gu_blk = ws
        if cutlass.const_expr(DFLAGS):
            gu_blk = ws + OFF_GU + Int64(launch_parity(si) * GUB)
        if cutlass.const_expr(ACT_LOADS_FIRST):
            # the act's first loads, then the weights (whose registers ptxas moves into the wgmma quads right behind
            # their loads, waiting for them), so that both are in flight together
            wait_ready(waits, ws, si, tid)
            pend = act_issue_flagged(gu_blk, warp, lane)
            raw0, sc0 = mma_issue(w2, I, True, row_base, 0, S.down_rows, I, w2_s, I // 128, warp, lane, 0, B_DOWN)
            stamp(DOWN, 0, rt, ws, tid)
            bad = P.syncthreads_or(act_bad_flagged(pend))
            if bad == 0:
                stamp(ACT, 1, rt, ws, tid)
                act_math_flagged(pend, sf, warp, lane, tid)
        elif cutlass.const_expr(S.fuse_act and M <= 2):
            # M <= 2: the weights after the wait, together with the act's loads (their latency hides behind the
            # act's math): issued before it, the dynamic down tasks' polls came back only ~1.2-1.6 us after the
            # task was taken, long after the last gate_up (8fb98a5's task-by-task trace; not w2 from HBM:
            # bdaddb5). Measured in one run (3cfc636 vs dbf5ac8): M = 1 / 2 -0.33 / -0.13 us, but M = 4 / 8
            # +0.6 / +0.7 (a longer act no longer hides the weights), so larger M keep the weights first.
            wait_ready(waits, ws, si, tid)
            raw0, sc0 = mma_issue(w2, I, True, row_base, 0, S.down_rows, I, w2_s, I // 128, warp, lane, 0, B_DOWN)
        else:
            raw0, sc0 = mma_issue(w2, I, True, row_base, 0, S.down_rows, I, w2_s, I // 128, warp, lane, 0, B_DOWN)
            wait_ready(waits, ws, si, tid)
        if cutlass.const_expr(not ACT_LOADS_FIRST):
            stamp(DOWN, 0, rt, ws, tid)
            if cutlass.const_expr(VOTE_FIRST):
                bad = Int32(1)  # (the first attempt is the loop's first round below)
            elif cutlass.const_expr(S.fuse_act):
                bad = stage_act_to_smem(ws, sf, si, tid, rt)
            else:
                stage_fp8_acts(ws + OFF_HQ, ws + OFF_HS, I, I // 128, Int32(0), I, sf, tid)
        if cutlass.const_expr(VOTE_FIRST):
            # the gate_up partials flag themselves: load them until none is the sentinel (a vote right after the
            # loads), then the act's math and staging once -- an early attempt costs its loads and a barrier, not
            # the math (on the sentinel NaNs SiLU would take its double-precision fallback)
            again = bad
            spins = Int32(0)
            while again != 0 and spins < SPIN_LIMIT:
                if spins > HOT_SPINS:  # (>: without ACT_LOADS_FIRST the first round is the loop's first, not a retry)
                    P.nanosleep(100)
                pend2 = act_issue_flagged(gu_blk, warp, lane)
                again = P.syncthreads_or(act_bad_flagged(pend2))
                if again == 0:
                    stamp(ACT, 1, rt, ws, tid)
                    act_math_flagged(pend2, sf, warp, lane, tid)
                spins = spins + 1
            if again != 0 and tid == 0:
                record_wait_failure(Int32(GATE_UP), Int32(0), Int32(1), ws, si)
            # (without ACT_LOADS_FIRST the first round is the loop's first: not a failed one)
            trace_retries(DOWN, rt, spins - (0 if ACT_LOADS_FIRST else 1), ws, tid)
            if cutlass.const_expr(QGMMA):
                P.fence_proxy_async_smem()
            cute.arch.sync_threads()
        elif cutlass.const_expr(DFLAGS):
            # M = 1: the act's math in every round, the vote after it (its first round mostly succeeds)
            if cutlass.const_expr(QGMMA):
                P.fence_proxy_async_smem()
            again = P.syncthreads_or(bad)
            spins = Int32(0)
            while again != 0 and spins < SPIN_LIMIT:
                if spins >= HOT_SPINS:
                    P.nanosleep(100)
                bad2 = stage_act_to_smem(ws, sf, si, tid, rt)
                if cutlass.const_expr(QGMMA):
                    P.fence_proxy_async_smem()
                again = P.syncthreads_or(bad2)
                spins = spins + 1
            if again != 0 and tid == 0:
                record_wait_failure(Int32(GATE_UP), Int32(0), Int32(1), ws, si)
            trace_retries(DOWN, rt, spins, ws, tid)
        else:
            if cutlass.const_expr(QGMMA):
                P.fence_proxy_async_smem()
            cute.arch.sync_threads()
        stamp(DOWN, 1, rt, ws, tid)
        outs = mma_task(w2, I, True, row_base, 0, S.down_rows, I, w2_s, I // 128, sf + S_ACT, sf + S_AS,
                        sf + S_RED, warp, lane, tid, raw0, sc0, B_DOWN, quad_zero(rt))
        stamp(DOWN, 2, rt, ws, tid)
        t_next = next_ticket_early(waits, ws, si, tid)
        for r, n, val in outs:
            if n < M:
                P.st_b16(o_shared + Int64(n * H + row_base + r) * 2, P.f32x2_to_bf16x2(val, val))
        keep_next_ticket(t_next, waits, si, tid)

    # ------------------------------------------------------------------------------------------------
    # stage: router scoring + grouped top-k for one token (one warp; expert e = lane * EPL + j)
    # ------------------------------------------------------------------------------------------------
    @cute.jit
    def route_fills(o_sorted: Int64, o_eids: Int64, tid: Int32):
        """The token sort's fills, before the route's wait: the sentinel (pair count) in every padding slot of
        sorted_token_ids, -1 in every expert_ids block past the end; the task overwrites the used ones."""
        for i in cutlass.range_constexpr((S.max_padded + THREADS - 1) // THREADS):
            if tid + i * THREADS < S.max_padded:
                P.st_b32(o_sorted + Int64(tid + i * THREADS) * 4, Uint32(P_PAIRS))
        for i in cutlass.range_constexpr((S.max_blocks + THREADS - 1) // THREADS):
            if tid + i * THREADS < S.max_blocks:
                P.st_b32(o_eids + Int64(tid + i * THREADS) * 4, Uint32(0xFFFFFFFF))

    @cute.jit
    def pair_local_expert(first_local: Int32, si: Int32, tid: Int32) -> Int32:
        """Pair `tid` (token tid // top_k, its pick tid % top_k): the picked expert's index among this rank's local
        experts, -1 for an expert of another rank, -2 past the pairs (those lanes match only each other and
        count nowhere)."""
        lid = Int32(-2)
        if tid < P_PAIRS:
            e = P.lds_b32(si + (SI_TOPK + tid) * 4) - first_local
            lid = P.sel_i32(P.sel_i32(e >= 0, 1, 0) & P.sel_i32(e < S.n_local, 1, 0), e, Int32(-1))
        return lid

    @cute.jit
    def route_token_sort(o_sorted: Int64, o_eids: Int64, o_ntpp: Int64, first_local: Int32, ws: Int64, si: Int32,
                         tid: Int32, real_waits: Int32, p: Int32, stamp_tile: Int32):
        """moe_align_block_size over the local experts, whole CTA: pair ranks by match.any and per-warp counts,
        a scan of the padded counts, then the stores."""
        warp = tid >> 5
        lane = tid & 31
        BS = S.block_size
        NL = S.n_local
        # rank of each (token, expert) pair among the pairs of its expert, in pair order: match.any inside a
        # warp, plus the counts of the earlier warps (per-warp count arrays, zeroed before the wait)
        lid = pair_local_expert(first_local, si, tid)
        rank = Int32(0)
        if warp < PAIR_WARPS:
            same = P.match_any(lid)
            below = same & P.lanemask_lt()
            rank = P.popc(below)
            if below == 0 and lid >= 0:
                P.sts_b32(si + (SI_CNT + warp * THREADS + lid) * 4, P.popc(same))
        cute.arch.sync_threads()
        stamp(ROUTE, 6, stamp_tile, ws, tid)
        for w in cutlass.range_constexpr(PAIR_WARPS - 1):
            if warp > w and lid >= 0:
                rank = rank + P.lds_b32(si + (SI_CNT + w * THREADS + lid) * 4)
        cnt = Int32(0)
        if tid < NL:
            for w in cutlass.range_constexpr(PAIR_WARPS):
                cnt = cnt + P.lds_b32(si + (SI_CNT + w * THREADS + tid) * 4)
        padded = P.sel_i32(P.sel_i32(tid < NL, 1, 0), (cnt + (BS - 1)) & Int32(-BS), 0)
        # inclusive scan of the padded counts: one warp when the local experts fit in it, else warp scans + totals
        x = padded
        total = Int32(0)
        if cutlass.const_expr(NL <= 32):
            if warp == 0:
                for sh in cutlass.range_constexpr(5):
                    y = cute.arch.shuffle_sync_up(x, 1 << sh)
                    x = x + P.sel_i32(P.sel_i32(lane >= (1 << sh), 1, 0), y, 0)
                if lane == 31:
                    P.sts_b32(si + SI_WTOT * 4, x)
                if tid < NL:
                    P.sts_b32(si + (SI_END + tid) * 4, x)
                    P.sts_b32(si + (SI_PAD + tid) * 4, padded)
            cute.arch.sync_threads()
            total = P.lds_b32(si + SI_WTOT * 4)
        else:
            for sh in cutlass.range_constexpr(5):
                y = cute.arch.shuffle_sync_up(x, 1 << sh)
                x = x + P.sel_i32(P.sel_i32(lane >= (1 << sh), 1, 0), y, 0)
            if lane == 31:
                P.sts_b32(si + (SI_WTOT + warp) * 4, x)
            cute.arch.sync_threads()
            prefix = Int32(0)
            for w in cutlass.range_constexpr(WARPS):
                wt = P.lds_b32(si + (SI_WTOT + w) * 4)
                prefix = prefix + P.sel_i32(P.sel_i32(w < warp, 1, 0), wt, 0)
                total = total + wt
            if tid < NL:
                P.sts_b32(si + (SI_END + tid) * 4, x + prefix)
                P.sts_b32(si + (SI_PAD + tid) * 4, padded)
            cute.arch.sync_threads()
        t_next = next_ticket_early(real_waits, ws, si, tid)
        # (sorted_token_ids was filled with the sentinel before the wait; the syncs since order it first)
        if tid < P_PAIRS:
            if lid >= 0 and p == 1:
                pos = P.lds_b32(si + (SI_END + lid) * 4) - P.lds_b32(si + (SI_PAD + lid) * 4) + rank
                P.st_b32(o_sorted + Int64(pos) * 4, Uint32(tid))
        # expert of each block: expert e owns ceil(count / BS) blocks from (its padded start) / BS; blocks past
        # the total keep the -1 written before the wait (an expert has at most M pairs: one per token)
        if tid < NL:
            blk0 = (P.lds_b32(si + (SI_END + tid) * 4) - padded) // BS
            for j in cutlass.range_constexpr((M + BS - 1) // BS):
                if j * BS < cnt and p == 1:
                    P.st_b32(o_eids + Int64(blk0 + j) * 4, Uint32(tid))
        if tid == 0 and p == 1:
            P.st_b32(o_ntpp, Uint32(total))
        keep_next_ticket(t_next, real_waits, si, tid)
        stamp(ROUTE, 7, stamp_tile, ws, tid)

    @cute.jit
    def route_logits(rp: Int64, m: Int32, e0: Int32):
        """(RFLAGS) Token m's logits of experts e0 .. e0 + 7 (the router partials of block rp summed in split order),
        and 1 if a loaded word was still the sentinel. Every load is issued before any check."""
        assert EPL == 8
        lg = [Float32(0.0)] * EPL
        bad = Int32(0)
        for s in cutlass.range_constexpr(S.router_splits):
            for v in cutlass.range_constexpr(EPL // 4):
                a = P.ld_relaxed_v4f(rp + Int64((s * M + m) * E + e0 + 4 * v) * 4)
                for j in cutlass.range_constexpr(4):
                    lg[4 * v + j] = lg[4 * v + j] + a[j]
                    bad = bad | P.sel_i32(P.f32_as_i32(a[j]) == SENT, 1, 0)
        return lg[0], lg[1], lg[2], lg[3], lg[4], lg[5], lg[6], lg[7], bad

    @cute.jit
    def stage_route(bias: Int64, o_logits: Int64, o_w: Int64, o_ids: Int64, o_sorted: Int64, o_eids: Int64,
                    o_ntpp: Int64, first_local: Int32, ws: Int64, si: Int32, tid: Int32, waits: Int32):
        """Routing in one task: warp m scores token m (sigmoid, grouped top-k, weights), then the whole CTA
        sorts the (token, expert) pairs for the fused MoE (moe_align_block_size). One hop instead of two."""
        warp = tid >> 5
        lane = tid & 31
        m = warp
        e0 = lane * EPL
        cbias = []
        for v in cutlass.range_constexpr(EPL // 4):  # the bias does not depend on any task: load it first
            c0, c1, c2, c3 = P.ld_nc_v4f(bias + Int64(e0 + 4 * v) * 4)
            cbias.extend([c0, c1, c2, c3])
        if cutlass.const_expr("route" in WHATIF):  # what-if: the route's fills and wait, none of its work
            griddep_if_first(waits, si)
            route_fills(o_sorted, o_eids, tid)
            wait_ready(waits, ws, si, tid)
            stamp(ROUTE, 0, Int32(0), ws, tid)
            return
        # Two passes over the same code -- a dynamic loop, so one copy of it: pass 0 runs first, before the PDL
        # wait when this is the CTA's first task, on whatever the partials hold (nothing it computes leaves shared
        # memory), so that the route's long unrolled selection code is in this SM's instruction cache when the
        # real logits arrive; pass 1 is the task. (Session 13: with the next call's weights streaming, the
        # register-only phases of the route ran 2.6 us against 1.0 in an idle trace; instruction fetches that
        # miss to L2 behind that stream are the suspect.) A stage run alone (waits == 0) makes one pass, and so does
        # TP1, whose route does not end its calls (session 14, H100: EP8 -0.1..-0.5 us with the warm-up and the
        # 1792-column norm tasks, TP1 -0.2..+0.3).
        first_pass = P.sel_i32(waits == 0, 1, 0) if cutlass.const_expr(S.small_shared) else Int32(1)
        for p in cutlass.range(first_pass, 2, 1, unroll=1):
            real_waits = P.sel_i32(p == 1, waits, 0)  # pass 0 takes no ticket
            stamp_tile = P.sel_i32(p == 1, 0, -1)  # ... and records no phase (trace builds: before the PDL wait)
            for w in cutlass.range_constexpr(PAIR_WARPS):  # per-warp pair counts of the token sort
                if tid < S.n_local:
                    P.sts_b32(si + (SI_CNT + w * THREADS + tid) * 4, Int32(0))
            cute.arch.sync_threads()  # (pass 0's token sort has read them)
            if p == 1:
                griddep_if_first(waits, si)  # the previous kernel may still read the outputs written below (PDL)
                route_fills(o_sorted, o_eids, tid)
                wait_ready(waits, ws, si, tid)  # (its barrier orders the fills before the pair stores below)
                stamp(ROUTE, 0, Int32(0), ws, tid)
            if warp < M:
                if cutlass.const_expr(RFLAGS):
                    # the router partials flag themselves: in the real pass, load them again until no word was
                    # the sentinel. The warm-up pass reads the other block -- the previous launch's partials, finite
                    # until this launch's router tasks refill it --, so that it runs the code paths of real logits
                    rp = ws + OFF_RP + Int64((launch_parity(si, RFLAGS) ^ (1 - p)) * RPB)
                    l0, l1, l2, l3, l4, l5, l6, l7, bad = route_logits(rp, m, e0)
                    spins = Int32(0)
                    while P.warp_any(bad * p) != 0 and spins < SPIN_LIMIT:
                        if spins >= HOT_SPINS:
                            P.nanosleep(100)
                        l0, l1, l2, l3, l4, l5, l6, l7, bad = route_logits(rp, m, e0)
                        spins = spins + 1
                    if bad * p != 0 and lane == 0:
                        record_wait_failure(Int32(ROUTER), Int32(0), Int32(1), ws, si)
                    trace_retries(ROUTE, stamp_tile, spins, ws, tid)
                    lg = [l0, l1, l2, l3, l4, l5, l6, l7]
                else:
                    lg = [Float32(0.0)] * EPL
                    for s in cutlass.range_constexpr(S.router_splits):
                        for v in cutlass.range_constexpr(EPL // 4):
                            a0, a1, a2, a3 = P.ld_cg_v4f(ws + OFF_RP + Int64((s * M + m) * E + e0 + 4 * v) * 4)
                            lg[4 * v] = lg[4 * v] + a0
                            lg[4 * v + 1] = lg[4 * v + 1] + a1
                            lg[4 * v + 2] = lg[4 * v + 2] + a2
                            lg[4 * v + 3] = lg[4 * v + 3] + a3
                if p == 1:
                    for v in cutlass.range_constexpr(EPL // 4):
                        P.st_v4f(o_logits + Int64(m * E + e0 + 4 * v) * 4, lg[4 * v], lg[4 * v + 1], lg[4 * v + 2],
                                 lg[4 * v + 3])
                stamp(ROUTE, 1, stamp_tile, ws, tid)
                sc = []
                bs = []
                for v in cutlass.range_constexpr(EPL // 4):
                    cb = cbias[4 * v: 4 * v + 4]
                    for j in cutlass.range_constexpr(4):
                        # sigmoid with a hardware reciprocal (~1 ulp): weights are checked to 1e-5
                        s_ = P.rcp_approx(Float32(1.0) + P.exp_f32(-lg[4 * v + j]))
                        b_ = s_ + cb[j]
                        sc.append(s_)
                        bs.append(P.sel_f32(P.is_nan(b_), Float32(NEG_INF), b_))
                # group score: sum of the top two biased scores of the group
                t1 = Float32(NEG_INF)
                t2 = Float32(NEG_INF)
                for j in cutlass.range_constexpr(EPL):
                    t2 = P.fmax(t2, -P.fmax(-t1, -bs[j]))  # max(t2, min(t1, b))
                    t1 = P.fmax(t1, bs[j])
                for sh in cutlass.range_constexpr(LPG.bit_length() - 1):
                    o1 = cute.arch.shuffle_sync_bfly(t1, 1 << sh)
                    o2 = cute.arch.shuffle_sync_bfly(t2, 1 << sh)
                    n2 = P.fmax(-P.fmax(-t1, -o1), P.fmax(t2, o2))
                    t1 = P.fmax(t1, o1)
                    t2 = n2
                gs = t1 + t2
                gs = P.sel_f32(P.is_nan(gs), Float32(NEG_INF), gs)
                grp = lane // LPG
                gkey = P.sortable_key(gs)
                any_finite = P.warp_max_i32(gkey > P.sortable_key(Float32(NEG_INF)))
                # keep the topk_group best groups: a group's rank = groups with a higher score, or an equal score and
                # a lower index (every lane of a group holds its score; one shuffle per group, no serial picks)
                rank = Int32(0)
                for q in cutlass.range_constexpr(S.n_group):
                    kq = cute.arch.shuffle_sync(gkey, q * LPG)
                    rank = rank + P.sel_i32(kq > gkey, 1, P.sel_i32(kq == gkey, q < grp, 0))
                kept = P.sel_i32(rank < S.topk_group, 1, 0)
                # expert keys: kept groups by biased score; other groups below any kept one (INT_MIN marks an
                # exhausted list slot, below every real key)
                keys = [P.sel_i32(kept, P.sortable_key(bs[j]), Int32(INT_MIN + 1)) for j in range(EPL)]
                stamp(ROUTE, 2, stamp_tile, ws, tid)
                # Each lane sorts its EPL candidates once (19-comparator network, descending key, lower expert
                # first on equal keys); then every pick is one warp max over the lanes' heads, and the lowest
                # lane holding that max (= the lowest expert index among equal keys) pops its head.
                ids_l = [e0 + j for j in range(EPL)]
                sc_l = list(sc)
                for layer in SORT8:
                    for a, b in layer:
                        better = P.sel_i32(keys[b] > keys[a], 1, P.sel_i32(keys[b] == keys[a], ids_l[b] < ids_l[a], 0))
                        ka, kb = P.sel_i32(better, keys[b], keys[a]), P.sel_i32(better, keys[a], keys[b])
                        ia, ib = P.sel_i32(better, ids_l[b], ids_l[a]), P.sel_i32(better, ids_l[a], ids_l[b])
                        sa, sb = P.sel_f32(better, sc_l[b], sc_l[a]), P.sel_f32(better, sc_l[a], sc_l[b])
                        keys[a], keys[b], ids_l[a], ids_l[b], sc_l[a], sc_l[b] = ka, kb, ia, ib, sa, sb
                stamp(ROUTE, 3, stamp_tile, ws, tid)
                my_id = Int32(0)
                my_w = Float32(0.0)
                tot = Float32(0.0)
                # The pick loop's dependency chain is warp max -> ballot -> pop (the lowest lane holding the max:
                # no lower lane in the ballot); the winner's lane index, id and score are gathered after the loop,
                # from each round's ballot and the heads each lane recorded (off the chain: 8 independent rounds).
                ltmask = P.lanemask_lt()
                rounds = []
                for k in cutlass.range_constexpr(S.top_k):
                    mx = P.warp_max_i32(keys[0])
                    mine = P.sel_i32(keys[0] == mx, 1, 0)
                    bal = P.ballot(mine)
                    pop = mine & P.sel_i32((bal & ltmask) == 0, 1, 0)
                    rounds.append((bal, ids_l[0], sc_l[0]))
                    pop = pop != 0
                    for j in cutlass.range_constexpr(EPL - 1):
                        keys[j] = P.sel_i32(pop, keys[j + 1], keys[j])
                        ids_l[j] = P.sel_i32(pop, ids_l[j + 1], ids_l[j])
                        sc_l[j] = P.sel_f32(pop, sc_l[j + 1], sc_l[j])
                    keys[EPL - 1] = P.sel_i32(pop, Int32(INT_MIN), keys[EPL - 1])
                for k in cutlass.range_constexpr(S.top_k):
                    bal, head_id, head_sc = rounds[k]
                    wl = P.lowest_bit_index(bal)
                    win = cute.arch.shuffle_sync(head_id, wl)
                    s_win = cute.arch.shuffle_sync(head_sc, wl)
                    tot = tot + s_win  # pick order, as the reference sums the selected weights
                    my_id = P.sel_i32(lane == k, win, my_id)
                    my_w = P.sel_f32(lane == k, s_win, my_w)
                stamp(ROUTE, 4, stamp_tile, ws, tid)
                inv = P.rcp_approx(tot + Float32(1e-20))
                # lane k < top_k stores pick k
                wk = P.sel_f32(any_finite, my_w * inv, Float32(1.0 / S.top_k))
                if cutlass.const_expr(S.fold_scaling):
                    wk = wk * Float32(S.scaling)
                idk = P.sel_i32(any_finite, my_id, lane)
                if lane < S.top_k:
                    if p == 1:
                        P.st_f32(o_w + Int64(m * S.top_k + lane) * 4, wk)
                        P.st_b32(o_ids + Int64(m * S.top_k + lane) * 4, Uint32(idk))
                    P.sts_b32(si + (SI_TOPK + m * S.top_k + lane) * 4, idk)
            cute.arch.sync_threads()
            stamp(ROUTE, 5, stamp_tile, ws, tid)

            # ---- token sorting (moe_align_block_size over the local experts)
            BS = S.block_size
            NL = S.n_local
            if cutlass.const_expr(P_PAIRS <= 32 and NL <= 32 and M <= BS):
                # Every pair in warp 0, every local expert a bit of one word, and at most M <= BS pairs per expert,
                # so each used expert owns exactly one block: its start is BS x (used experts below it), one warp
                # OR and popcounts -- no shared-memory counts, scan or CTA barriers (~0.35 us at M = 1 in session
                # 16's trace, the route's last phase while it ended the call).
                if warp == 0:
                    lid = pair_local_expert(first_local, si, tid)
                    same = P.match_any(lid)
                    rank = P.popc(same & P.lanemask_lt())
                    used = P.warp_or_b32(P.sel_i32(lid >= 0, Int32(1) << (lid & 31), 0))
                    stamp(ROUTE, 6, stamp_tile, ws, tid)
                    t_next = next_ticket_early(real_waits, ws, si, tid)
                    # (sorted_token_ids / expert_ids were filled before the wait; the syncs since order it first)
                    if tid < P_PAIRS:
                        if lid >= 0 and p == 1:
                            below = used & ((Int32(1) << (lid & 31)) - 1)
                            P.st_b32(o_sorted + Int64(P.popc(below) * BS + rank) * 4, Uint32(tid))
                    if lane < NL:  # lane = local expert: its block, if it has pairs
                        if ((used >> lane) & 1) != 0 and p == 1:
                            P.st_b32(o_eids + Int64(P.popc(used & P.lanemask_lt())) * 4, Uint32(lane))
                    if tid == 0 and p == 1:
                        P.st_b32(o_ntpp, Uint32(P.popc(used) * BS))
                    keep_next_ticket(t_next, real_waits, si, tid)
                stamp(ROUTE, 7, stamp_tile, ws, tid)
            else:
                route_token_sort(o_sorted, o_eids, o_ntpp, first_local, ws, si, tid, real_waits, p, stamp_tile)

    # ------------------------------------------------------------------------------------------------
    @cute.jit
    def run_stage(stage: Int32, tile: Int32, hidden: Int64, residual: Int64, norm_w: Int64, gate_w: Int64,
                  bias: Int64, w13: Int64, w13_s: Int64, w2: Int64, w2_s: Int64, o_res: Int64, o_logits: Int64,
                  o_w: Int64, o_ids: Int64, o_aq: Int64, o_as: Int64, o_shared: Int64, o_sorted: Int64,
                  o_eids: Int64, o_ntpp: Int64, ws: Int64, first_local: Int32, sf: Int32, si: Int32,
                  tid: Int32, waits: Int32):
        """Each stage issues its dependency-free loads, then waits for its inputs (wait_ready) when waits != 0."""
        if stage == NORM:
            stage_norm(tile, hidden, residual, norm_w, o_res, o_aq, o_as, ws, sf, si, tid, waits)
        if stage == ROUTER:
            stage_router(tile, gate_w, ws, sf, si, tid, waits)
        if stage == GATE_UP:
            stage_gate_up(tile, hidden, residual, o_res, o_aq, o_as, w13, w13_s, ws, sf, si, tid, waits)
        if stage == ROUTE:
            stage_route(bias, o_logits, o_w, o_ids, o_sorted, o_eids, o_ntpp, first_local, ws, si, tid, waits)
        if stage == ACT:
            stage_act(tile, ws, si, tid, waits)
        if stage == DOWN:
            stage_down(tile, w2, w2_s, o_shared, ws, sf, si, tid, waits)

    @cute.kernel
    def megapre_kernel(hidden: Int64, residual: Int64, norm_w: Int64, gate_w: Int64, bias: Int64, w13: Int64,
                       w13_s: Int64, w2: Int64, w2_s: Int64, o_res: Int64, o_logits: Int64, o_w: Int64,
                       o_ids: Int64, o_aq: Int64, o_as: Int64, o_shared: Int64, o_sorted: Int64, o_eids: Int64,
                       o_ntpp: Int64, ws: Int64, tasks: Int64, n_tasks: Int32, first_local: Int32,
                       mode: Int32, prefetch_ctas: Int32, prefetch_delay: Int32):
        tid = cute.arch.thread_idx()[0]
        alloc = SmemAllocator()
        s_f = alloc.allocate_tensor(Float32, cute.make_layout(SF), byte_alignment=16)
        s_i = alloc.allocate_tensor(Int32, cute.make_layout(KernelSpec.SMEM_INTS), byte_alignment=16)
        s_t = alloc.allocate_tensor(Int32, cute.make_layout(NT), byte_alignment=16)
        sf = Int32(s_f.iterator.toint())
        si = Int32(s_i.iterator.toint())
        st = Int32(s_t.iterator.toint())
        ctr = ws + WS_COUNTERS * 4
        if cutlass.const_expr(S.staged):
            # one stage as its own small kernel (mode = the stage): tile = blockIdx.x, no queue, no counters. Only
            # in the staged build: its inlined copy of every stage doubled the fused kernel's code (plan.KernelSpec)
            run_stage(mode, cute.arch.block_idx()[0], hidden, residual, norm_w, gate_w, bias, w13, w13_s,
                      w2, w2_s, o_res, o_logits, o_w, o_ids, o_aq, o_as, o_shared, o_sorted, o_eids, o_ntpp, ws,
                      first_local, sf, si, tid, Int32(0))
        elif cutlass.const_expr("empty" in WHATIF):
            # what-if "empty": what a launch of this grid costs per call with nothing in it (PDL as below)
            P.griddep_launch_dependents()
            P.griddep_wait()
        else:
            # PDL: the next kernel in the stream may be scheduled now; its CTAs take the SMs ours leave (one CTA
            # per SM fits) and start their weight prefetch and first weight loads while our last tasks run.
            P.griddep_launch_dependents()
            bid = cute.arch.block_idx()[0]
            grid = cute.arch.grid_dim()[0]
            n_static = static_count(grid)  # CTA b < n_static starts on task b (no ticket)
            n_norm = P.sel_i32(n_static < NORM_TASKS, n_static, Int32(NORM_TASKS))  # ... of which norm tasks
            if tid == 0:
                P.sts_b32(si + (SI_TASK + T_KNOWN) * 4, Int32(0))
                P.sts_b32(si + (SI_TASK + T_NORM_SEEN) * 4, Int32(0))
                P.sts_b32(si + (SI_TASK + T_NEXT) * 4, Int32(-1))
                P.sts_b32(si + SI_PF * 4, Int32(-1))
                if cutlass.const_expr(STAMPS):
                    P.sts_u64(si + SI_WAIT_T * 4, Int64(0))
                # Weights and the norm's inputs do not depend on the previous kernel: ask L2 for them before it
                # has finished. (A prefetch is only a hint -- L2 is where every SM's writes land, so hidden /
                # residual prefetched before the previous kernel wrote them are still read fresh after
                # griddepcontrol.wait.) The norm's inputs first, whole; the shared expert's weight matrices are
                # split between the prefetch_ctas CTAs after the norm CTAs, so that the norm weight (the only HBM
                # read on the routing chain's first task) is not queued behind the weight stream. Each of those
                # CTAs issues its slice from its first GEMM task, right after that task's own weight loads
                # (prefetch_after_weights): ahead of them, the router's weights queued behind 86 KB of prefetch per
                # SM (H200, session 25: EP8 M = 1 / 2 -0.11 / -0.06 us, M = 4 / 8 even). Not the router's
                # weights: its tasks are all static first tasks (every M), which load their own under PDL;
                # prefetching them too was 40% of the prefetch bytes, and dropping it made EP8 M = 1 / 2 / 4
                # 0.1-0.3 us faster (session 13, H200, two calls).
                if prefetch_ctas > 0:
                    if bid == 0:
                        P.prefetch_l2_bulk(norm_w, Int32(H * 2))
                        P.prefetch_l2_bulk(bias, Int32(E * 4))
                    if bid == 1 % grid:
                        P.prefetch_l2_bulk(hidden, Int32(M * H * 2))
                    if bid == 2 % grid:
                        P.prefetch_l2_bulk(residual, Int32(M * H * 2))
                if bid >= n_norm:
                    # CTAs that do not start on a norm task hold back their weight loads (and prefetch) for
                    # prefetch_delay ns, so that the norm weight gets ahead of the weight stream in the memory
                    # queues; their tasks wait for the norm anyway (MEGAPRE_PREFETCH_DELAY_NS, sweep)
                    t_go = P.globaltimer() + Int64(prefetch_delay)
                    while P.globaltimer() < t_go:
                        pass
                    k = bid - n_norm
                    n_pf = P.sel_i32(prefetch_ctas < grid - n_norm, prefetch_ctas, grid - n_norm)
                    if k < n_pf and not WHATIF_NO_WEIGHTS:  # (for prefetch_after_weights)
                        P.sts_b32(si + SI_PF * 4, k)
                        P.sts_b32(si + (SI_PF + 1) * 4, n_pf)
                        P.sts_u64(si + (SI_PF + 2) * 4, w13)
                        P.sts_u64(si + (SI_PF + 4) * 4, w2)
            # The task table (one packed word per task, uploaded before any launch that uses it) into shared
            # memory, while the previous kernel may still run.
            for i in cutlass.range_constexpr((NT + THREADS - 1) // THREADS):
                if tid + i * THREADS < n_tasks:
                    P.sts_b32(st + (tid + i * THREADS) * 4, Int32(P.ld_nc_b32(tasks + Int64(tid + i * THREADS) * 4)))
            cute.arch.sync_threads()  # the table copy above is complete before thread 0 decodes any task
            # CTA b runs task b first (no ticket: a contended atomic on one word costs ~0.5 us at the start of
            # the routing chain), and it starts before the previous kernel has finished: its weight loads go out
            # under PDL, and each stage calls griddepcontrol.wait before it reads or writes anything the previous
            # kernel may touch (stage_norm, stage_route, wait_ready). Later tasks come from the ticket queue
            # (take_ticket): no reset between launches, the 64-bit ticket counter only grows, and every launch
            # takes exactly per_launch tickets (plan.tickets_per_launch: each CTA ends on one past the table, except
            # the exit-free ones, which leave after a terminal task from the queue), so launch L
            # owns tickets [L * per_launch, (L + 1) * per_launch); the counters only grow too, and a wait in
            # launch L compares against L * tiles + target (32-bit wrapping arithmetic on both sides).
            # A static task that waits learns the launch number from a plain read of the ticket counter
            # (learn_launch); the others from their first ticket.
            # Deadlock freedom: a task waits only on tasks earlier in the table; static ones run on lower CTAs,
            # which the hardware dispatches first, and dynamic ones were taken by running CTAs.
            static = P.sel_i32(bid < n_static, 1, 0)
            waits = Int32(FIRST_TASK)
            running = Int32(1)
            while running != 0:
                if tid == 0:
                    t_ticket = P.globaltimer()
                    ticket = bid
                    if static == 0:
                        early = P.lds_b32(si + (SI_TASK + T_NEXT) * 4)
                        if early >= 0:
                            ticket = n_static + early
                            P.sts_b32(si + (SI_TASK + T_NEXT) * 4, Int32(-1))
                        else:
                            ticket = n_static + take_ticket(ws, si)
                    P.sts_b32(si + SI_TASK * 4, ticket)
                    if ticket < n_tasks:
                        word = P.lds_b32(st + ticket * 4)
                        P.sts_b32(si + (SI_TASK + 1) * 4, word & 7)  # stage
                        P.sts_b32(si + (SI_TASK + 2) * 4, (word >> 6) & ((1 << TILE_BITS) - 1))  # tile
                        P.sts_b32(si + (SI_TASK + 3) * 4, ((word >> 3) & 7) - 1)  # wait counter (-1: none)
                        P.sts_b32(si + (SI_TASK + 4) * 4, (word >> 18) & ((1 << TARGET_BITS) - 1))  # wait target
                        P.sts_b32(si + (SI_TASK + T_NORM_AT_START) * 4, P.lds_b32(si + (SI_TASK + T_NORM_SEEN) * 4))
                        # A terminal task taken from the queue: its CTA leaves after it, without the ticket
                        # round trip at the end of the call's last tasks (plan.exit_free_tasks counts them).
                        terminal = Int32(0)
                        for ts in cutlass.range_constexpr(len(TERMINAL_STAGES)):
                            terminal = terminal | P.sel_i32((word & 7) == TERMINAL_STAGES[ts], 1, 0)
                        # (exit_free_count recomputed here, not kept live through the loop: TP1 is at 255 registers)
                        if static == 0 and terminal != 0 and exit_free_count(cute.arch.grid_dim()[0]) > 0:
                            P.sts_b32(si + (SI_TASK + T_NEXT) * 4, Int32(EXIT_NOW))
                        if cutlass.const_expr(S.trace):
                            P.sts_u64(si + (SI_TASK + T_TAKEN) * 4, t_ticket)
                            P.sts_u64(si + (SI_TASK + T_READY) * 4, P.globaltimer())  # wait_ready overwrites
                static = Int32(0)
                cute.arch.sync_threads()
                task = P.lds_b32(si + SI_TASK * 4)
                if task >= n_tasks:
                    running = Int32(0)
                else:
                    stage = P.lds_b32(si + (SI_TASK + 1) * 4)
                    tile = P.lds_b32(si + (SI_TASK + 2) * 4)
                    run_stage(stage, tile, hidden, residual, norm_w, gate_w, bias, w13, w13_s, w2, w2_s, o_res,
                              o_logits, o_w, o_ids, o_aq, o_as, o_shared, o_sorted, o_eids, o_ntpp, ws,
                              first_local, sf, si, tid, waits)
                    waits = Int32(1)
                    t_taken = Int64(0)
                    t_ready = Int64(0)
                    if cutlass.const_expr(S.trace):  # (read before the barrier: thread 0 rewrites them after it)
                        t_taken = P.lds_u64(si + (SI_TASK + T_TAKEN) * 4)
                        t_ready = P.lds_u64(si + (SI_TASK + T_READY) * 4)
                    cute.arch.sync_threads()
                    if tid == RELEASER:
                        # bar.sync above + release: every thread's writes of this task are published. Stages no
                        # task waits on (route, down) skip it: the kernel's end publishes their outputs. Not thread
                        # 0: the release's fence waits for the task's stores to land (~0.3-0.5 us), and thread 0
                        # meanwhile takes the CTA's next ticket, so the next task's weight loads go out that much
                        # sooner. (`stage` is this task's: thread 0 may already be decoding the next one.)
                        waited = Int32(0)
                        for c in cutlass.range_constexpr(len(WAITED)):
                            waited = waited | P.sel_i32(stage == WAITED[c], 1, 0)
                        if waited != 0:
                            if cutlass.const_expr("fence" in WHATIF):  # what-if: the signal without its fence
                                P.red_relaxed_add(ctr + Int64(stage) * 4, Int32(1))
                            else:
                                P.red_release_add(ctr + Int64(stage) * 4, Int32(1))
                        if cutlass.const_expr(S.trace):
                            # (written here, after the stage's griddepcontrol.wait: the previous launch on this
                            # workspace may have been tracing into the same records)
                            rec = ws + OFF_TR + Int64(task) * (TRACE_INTS * 8)
                            P.st_u64(rec, Int64(bid))
                            P.st_u64(rec + 8, t_taken)
                            P.st_u64(rec + 16, t_ready)
                            P.st_u64(rec + 24, P.globaltimer())
            if cutlass.const_expr(STAMPS):
                # (what-if "stamps") when this CTA's first griddepcontrol.wait returned, and now, as it leaves
                if tid == 0:
                    slot = P.lds_b32(si + (SI_TASK + T_LAUNCH) * 4) & (PERIOD_SLOTS - 1)
                    rec = ws + OFF_PERIOD + Int64((slot * PERIOD_CTAS + bid) * 16)
                    P.st_u64(rec, P.lds_u64(si + SI_WAIT_T * 4))
                    P.st_u64(rec + 8, P.globaltimer())

    megapre_kernel.set_name_prefix("megapre_preamble", remove_cutlass_symbol=True, keep_mangled_name=False)

    @cute.jit
    def launch(hidden: Int64, residual: Int64, norm_w: Int64, gate_w: Int64, bias: Int64, w13: Int64,
               w13_s: Int64, w2: Int64, w2_s: Int64, o_res: Int64, o_logits: Int64, o_w: Int64, o_ids: Int64,
               o_aq: Int64, o_as: Int64, o_shared: Int64, o_sorted: Int64, o_eids: Int64, o_ntpp: Int64,
               ws: Int64, tasks: Int64, n_tasks: Int32, first_local: Int32, mode: Int32, prefetch_ctas: Int32,
               prefetch_delay: Int32, grid: Int32):
        megapre_kernel(hidden, residual, norm_w, gate_w, bias, w13, w13_s, w2, w2_s, o_res, o_logits, o_w, o_ids,
                       o_aq, o_as, o_shared, o_sorted, o_eids, o_ntpp, ws, tasks, n_tasks, first_local,
                       mode, prefetch_ctas, prefetch_delay).launch(grid=[grid, 1, 1], block=[THREADS, 1, 1])

    return megapre_kernel, launch


PARAMS = ("hidden", "residual", "norm_w", "gate_w", "bias", "w13", "w13_s", "w2", "w2_s", "o_res", "o_logits",
          "o_w", "o_ids", "o_aq", "o_as", "o_shared", "o_sorted", "o_eids", "o_ntpp", "ws", "tasks", "n_tasks",
          "first_local", "mode", "prefetch_ctas", "prefetch_delay")
PARAM_TYPES = ("u64",) * 21 + ("s32",) * 5
