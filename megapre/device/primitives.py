"""PTX-level primitives for the megakernel: memory access with explicit cache behaviour, numeric conversions
with vLLM's rounding, warp reductions on integer keys, and the acquire/release counter protocol.

Why inline PTX and not CuTe's tensor algebra: every access here has a deliberate form (16-byte non-coherent
streaming loads for weights, coherent loads for data other CTAs produced in this launch, 32-bit shared
addresses), and conversions must round exactly like the reference (cvt.rn / satfinite). All addresses are
Int64 generic global addresses or Int32 shared-window addresses.
"""
from __future__ import annotations

import struct

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint32
from cutlass._mlir import ir
from cutlass._mlir.dialects import llvm

from . import bf16_ptx, fast_div


def _coerce(a):
    """Python ints/floats become Int32/Float32 and predicates become 0/1 Int32, so helpers take any of them."""
    if isinstance(a, bool) or isinstance(a, cutlass.Boolean):
        return Int32(a)
    if isinstance(a, int):
        return Int32(a)
    if isinstance(a, float):
        return Float32(a)
    return a


def _asm(ret_types, args, asm: str, constraints: str, side_effects: bool = False):
    """Emit one inline-asm statement. ret_types: list of DSL numeric types (possibly empty)."""
    vals = [_coerce(a).ir_value() for a in args]
    kw = dict(has_side_effects=side_effects, is_align_stack=False, asm_dialect=llvm.AsmDialect.AD_ATT)
    if len(ret_types) == 0:
        llvm.inline_asm(None, vals, asm, constraints, **kw)
        return None
    if len(ret_types) == 1:
        return ret_types[0](llvm.inline_asm(ret_types[0].mlir_type, vals, asm, constraints, **kw))
    st = ir.Type.parse("!llvm.struct<(" + ", ".join(str(t.mlir_type) for t in ret_types) + ")>")
    r = llvm.inline_asm(st, vals, asm, constraints, **kw)
    return [t(llvm.extractvalue(t.mlir_type, r, [i])) for i, t in enumerate(ret_types)]


# ---- global memory ------------------------------------------------------------------------------------
# Weights and kernel inputs are read-only for the whole launch: non-coherent path, not kept in L1.
@cute.jit
def ld_nc_b32(addr: Int64) -> Uint32:
    return _asm([Uint32], [addr], "ld.global.nc.L1::no_allocate.b32 $0, [$1];", "=r,l", True)


@cute.jit
def add_u32(a: Uint32, b: Int32) -> Uint32:
    """a + b as one integer add that ptxas cannot fold (b: a runtime value)."""
    return _asm([Uint32], [a, b], "add.u32 $0, $1, $2;", "=r,r,r", True)


@cute.jit
def ld_nc_v2(addr: Int64):
    return _asm([Uint32, Uint32], [addr], "ld.global.nc.L1::no_allocate.v2.b32 {$0, $1}, [$2];", "=r,=r,l", True)


@cute.jit
def ld_nc_v4(addr: Int64):
    return _asm([Uint32] * 4, [addr], "ld.global.nc.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$4];",
                "=r,=r,=r,=r,l", True)


# Data written by other CTAs earlier in this launch: coherent at L2 (.cg), ordered by the counter protocol.
@cute.jit
def ld_cg_f32(addr: Int64) -> Float32:
    return _asm([Float32], [addr], "ld.global.cg.f32 $0, [$1];", "=f,l", True)


@cute.jit
def ld_cg_b32(addr: Int64) -> Int32:
    return _asm([Int32], [addr], "ld.global.cg.b32 $0, [$1];", "=r,l", True)


@cute.jit
def ld_cg_v2(addr: Int64):
    return _asm([Uint32, Uint32], [addr], "ld.global.cg.v2.b32 {$0, $1}, [$2];", "=r,=r,l", True)


@cute.jit
def ld_cg_v4f(addr: Int64):
    return _asm([Float32] * 4, [addr], "ld.global.cg.v4.f32 {$0, $1, $2, $3}, [$4];", "=f,=f,=f,=f,l", True)


@cute.jit
def st_b32(addr: Int64, v: Uint32):
    _asm([], [addr, v], "st.global.b32 [$0], $1;", "l,r", True)


@cute.jit
def st_f32(addr: Int64, v: Float32):
    _asm([], [addr, v], "st.global.f32 [$0], $1;", "l,f", True)


@cute.jit
def st_b16(addr: Int64, v: Uint32):
    _asm([], [addr, v], "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $1; st.global.b16 [$0], lo; }", "l,r", True)


@cute.jit
def st_v2(addr: Int64, a: Uint32, b: Uint32):
    _asm([], [addr, a, b], "st.global.v2.b32 [$0], {$1, $2};", "l,r,r", True)


@cute.jit
def st_v4f(addr: Int64, a: Float32, b: Float32, c: Float32, d: Float32):
    _asm([], [addr, a, b, c, d], "st.global.v4.f32 [$0], {$1, $2, $3, $4};", "l,f,f,f,f", True)


# ---- shared memory (32-bit shared-window addresses) ---------------------------------------------------
@cute.jit
def lds_b32(saddr: Int32) -> Int32:
    return _asm([Int32], [saddr], "ld.shared.b32 $0, [$1];", "=r,r", True)


@cute.jit
def sts_b32(saddr: Int32, v: Int32):
    _asm([], [saddr, v], "st.shared.b32 [$0], $1;", "r,r", True)


@cute.jit
def lds_u64(saddr: Int32) -> Int64:
    return _asm([Int64], [saddr], "ld.shared.u64 $0, [$1];", "=l,r", True)


@cute.jit
def sts_u64(saddr: Int32, v: Int64):
    _asm([], [saddr, v], "st.shared.u64 [$0], $1;", "r,l", True)


@cute.jit
def lds_f32(saddr: Int32) -> Float32:
    return _asm([Float32], [saddr], "ld.shared.f32 $0, [$1];", "=f,r", True)


@cute.jit
def sts_f32(saddr: Int32, v: Float32):
    _asm([], [saddr, v], "st.shared.f32 [$0], $1;", "r,f", True)


# ---- conversions ----------------------------------------------------------------------------------------
@cute.jit
def bf16x2_to_f32(v: Uint32):
    """Packed bf16 pair (low half first) -> two f32 (exact)."""
    return _asm([Float32, Float32], [v],
                "{ .reg .b32 t; " + bf16_ptx.BF16X2_TO_F32.format(t="t", v="$2", lo="$0", hi="$1") + " }", "=f,=f,r")


@cute.jit
def f32x2_to_bf16x2(lo: Float32, hi: Float32) -> Uint32:
    """Round two f32 to bf16 (nearest even), packed with ``lo`` in the low half."""
    return _asm([Uint32], [hi, lo], bf16_ptx.F32X2_TO_BF16X2.format(out="$0", hi="$1", lo="$2"), "=r,f,f")


@cute.jit
def round_to_e4m3_grid(x: Float32) -> Float32:
    """x rounded (nearest even) to the nearest e4m3 value, still as f32.

    Why: on sm_90 cvt.rn.satfinite.e4m3x2.f32 rounds through f16 (double rounding); 0.2% of codes then
    differ from a correctly rounded conversion (torch, Triton). Rounding to the e4m3 grid first makes that
    conversion exact. Normal range: round the f32 mantissa to 3 bits; subnormal range (|x| < 2^-6): to a
    multiple of 2^-9."""
    return _asm([Float32], [x],
                "{ .reg .b32 b, t, l; .reg .f32 a, s; .reg .pred p;"
                " mov.b32 b, $1; shr.u32 l, b, 20; and.b32 l, l, 1;"
                " add.u32 t, b, 0x7FFFF; add.u32 t, t, l; and.b32 t, t, 0xFFF00000;"
                " abs.f32 a, $1; setp.lt.f32 p, a, 0f3C800000;"
                " mul.f32 s, $1, 0f44000000; cvt.rni.f32.f32 s, s; mul.f32 s, s, 0f3B000000;"
                " mov.b32 $0, t; @p mov.f32 $0, s; }",
                "=f,f")


@cute.jit
def max_neg448(x: Float32) -> Float32:
    """max(x, -448): max.f32 returns its non-NaN operand, so a NaN becomes -448 -- vLLM's fmaxf(q, -448)."""
    return _asm([Float32], [x], "max.f32 $0, $1, 0fC3E00000;", "=f,f")


@cute.jit
def f32x4_to_e4m3x4(a: Float32, b: Float32, c: Float32, d: Float32) -> Uint32:
    """Four quotients -> four e4m3 codes as vLLM's fminf(fmaxf(q, -448), 448) and conversion give them: a NaN -448,
    the rest rounded to nearest even and saturated to +-448; ``a`` in byte 0. (The max also keeps NaNs away from
    round_to_e4m3_grid, which would carry a canonical NaN's mantissa into the sign bit. A quotient here is at most
    ~448 or inf -- |x| <= amax -- so the grid rounding cannot overflow the exponent.)"""
    a, b, c, d = max_neg448(a), max_neg448(b), max_neg448(c), max_neg448(d)
    a, b, c, d = round_to_e4m3_grid(a), round_to_e4m3_grid(b), round_to_e4m3_grid(c), round_to_e4m3_grid(d)
    return _asm([Uint32], [a, b, c, d],
                "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;"
                " mov.b32 $0, {lo, hi}; }",
                "=r,f,f,f,f")


@cute.jit
def f32_as_i32(x: Float32) -> Int32:
    return _asm([Int32], [x], "mov.b32 $0, $1;", "=r,f")


@cute.jit
def exp_f32(x: Float32) -> Float32:
    """e^x via ex2.approx (2 ulp), as CUDA's __expf."""
    return _asm([Float32], [x], "{ .reg .f32 t; mul.f32 t, $1, 0f3FB8AA3B; ex2.approx.ftz.f32 $0, t; }", "=f,f")


@cute.jit
def fmax(a: Float32, b: Float32) -> Float32:
    return _asm([Float32], [a, b], "max.f32 $0, $1, $2;", "=f,f,f")


@cute.jit
def is_nan(x: Float32) -> Int32:
    return _asm([Int32], [x], "{ .reg .pred p; testp.notanumber.f32 p, $1; selp.b32 $0, 1, 0, p; }", "=r,f")


@cute.jit
def sortable_key(x: Float32) -> Int32:
    """f32 -> i32 with the same order (for warp max/min with redux.sync); -inf -> -2139095041."""
    b = f32_as_i32(x)
    return b ^ ((b >> 31) & Int32(0x7FFFFFFF))


# ---- warp collectives ----------------------------------------------------------------------------------
@cute.jit
def warp_max_i32(v: Int32) -> Int32:
    return _asm([Int32], [v], "redux.sync.max.s32 $0, $1, 0xffffffff;", "=r,r", True)


@cute.jit
def warp_amax(a: Float32, b: Float32, c: Float32, d: Float32) -> Float32:
    """max |x| over 4 values per lane and the warp, NaNs skipped as vLLM's fmaxf reduction skips them: max.f32 over
    the lane's four (it returns the non-NaN operand), a lane of four NaNs read as 0, then one redux.sync over the
    bits (|x| as bits orders like an unsigned integer). A group of NaNs gives 0."""
    return _asm([Float32], [a, b, c, d],
                "{ .reg .f32 a, b, c, d; .reg .b32 t; .reg .pred p; abs.f32 a, $1; abs.f32 b, $2; abs.f32 c, $3;"
                " abs.f32 d, $4; max.f32 a, a, b; max.f32 c, c, d; max.f32 a, a, c; mov.b32 t, a;"
                " setp.gt.u32 p, t, 0x7f800000; selp.b32 t, 0, t, p;"
                " redux.sync.max.u32 t, t, 0xffffffff; mov.b32 $0, t; }", "=f,f,f,f,f")


@cute.jit
def warp_sum_f32(v: Float32) -> Float32:
    """Butterfly sum: every lane gets the same bits (fixed order), so results are deterministic."""
    for off in cutlass.range_constexpr(5):
        v = v + cute.arch.shuffle_sync_bfly(v, 16 >> off)
    return v


# Data that flags itself (KernelSpec.norm_flags): morally strong accesses, one per 32-bit word (PTX treats a
# vector access as one access per element), so a consumer polling a word sees either the sentinel or the value.
@cute.jit
def ld_relaxed_v4(addr: Int64):
    return _asm([Uint32] * 4, [addr], "ld.relaxed.gpu.global.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", True)


@cute.jit
def ld_relaxed_v2(addr: Int64):
    return _asm([Uint32, Uint32], [addr], "ld.relaxed.gpu.global.v2.b32 {$0, $1}, [$2];", "=r,=r,l", True)


@cute.jit
def ld_relaxed_v4f_if(addr: Int64, pred: Int32):
    """ld_relaxed_v4f where pred != 0, else four zeros and no memory access."""
    return _asm([Float32] * 4, [addr, pred],
                "{ .reg .pred p; setp.ne.b32 p, $5, 0; mov.f32 $0, 0f00000000; mov.f32 $1, 0f00000000; "
                "mov.f32 $2, 0f00000000; mov.f32 $3, 0f00000000; "
                "@p ld.relaxed.gpu.global.v4.f32 {$0, $1, $2, $3}, [$4]; }", "=f,=f,=f,=f,l,r", True)


@cute.jit
def ld_relaxed_v4f(addr: Int64):
    return _asm([Float32] * 4, [addr], "ld.relaxed.gpu.global.v4.f32 {$0, $1, $2, $3}, [$4];", "=f,=f,=f,=f,l", True)


@cute.jit
def ld_relaxed_f32(addr: Int64) -> Float32:
    return _asm([Float32], [addr], "ld.relaxed.gpu.global.f32 $0, [$1];", "=f,l", True)


@cute.jit
def st_relaxed_v2(addr: Int64, a: Uint32, b: Uint32):
    _asm([], [addr, a, b], "st.relaxed.gpu.global.v2.b32 [$0], {$1, $2};", "l,r,r", True)


@cute.jit
def st_relaxed_b32(addr: Int64, v: Uint32):
    _asm([], [addr, v], "st.relaxed.gpu.global.b32 [$0], $1;", "l,r", True)


@cute.jit
def st_relaxed_f32(addr: Int64, v: Float32):
    _asm([], [addr, v], "st.relaxed.gpu.global.f32 [$0], $1;", "l,f", True)


@cute.jit
def syncthreads_or(pred: Int32) -> Int32:
    """__syncthreads_or: a CTA barrier (barrier 0, every thread, the memory ordering of bar.sync) that returns 1 on
    every thread if pred != 0 on any thread, else 0."""
    return _asm([Int32], [pred], "{ .reg .pred p, q; setp.ne.s32 p, $1, 0; bar.red.or.pred q, 0, p; "
                "selp.s32 $0, 1, 0, q; }", "=r,r", True)


# ---- inter-CTA synchronization -------------------------------------------------------------------------
@cute.jit
def ld_relaxed_u64(addr: Int64) -> Int64:
    return _asm([Int64], [addr], "ld.relaxed.gpu.global.u64 $0, [$1];", "=l,l", True)


@cute.jit
def ld_acquire(addr: Int64) -> Int32:
    """(SASS: LDG.E.STRONG.GPU, then CCTL.IVALL -- every acquire load invalidates the SM's L1. Polling relaxed and
    acquiring once at the end -- by a fence or by one acquire re-read -- was slower: session 22.)"""
    return _asm([Int32], [addr], "ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", True)


@cute.jit
def red_release_add(addr: Int64, v: Int32):
    _asm([], [addr, v], "red.release.gpu.global.add.u32 [$0], $1;", "l,r", True)


@cute.jit
def red_relaxed_add(addr: Int64, v: Int32):
    """No ordering: only the what-if build "fence" uses it, to time the release's fence (wrong under load)."""
    _asm([], [addr, v], "red.relaxed.gpu.global.add.u32 [$0], $1;", "l,r", True)


@cute.jit
def nanosleep(ns: int):
    _asm([], [], f"nanosleep.u32 {ns};", "", True)


@cute.jit
def fabs(x: Float32) -> Float32:
    return _asm([Float32], [x], "abs.f32 $0, $1;", "=f,f")


@cute.jit
def sel_f32(c: Int32, a: Float32, b: Float32) -> Float32:
    """c != 0 ? a : b"""
    return _asm([Float32], [c, a, b], "{ .reg .pred p; setp.ne.s32 p, $1, 0; selp.f32 $0, $2, $3, p; }", "=f,r,f,f")


@cute.jit
def sel_i32(c: Int32, a: Int32, b: Int32) -> Int32:
    """c != 0 ? a : b"""
    return _asm([Int32], [c, a, b], "{ .reg .pred p; setp.ne.s32 p, $1, 0; selp.b32 $0, $2, $3, p; }", "=r,r,r,r")


@cute.jit
def ld_nc_f32(addr: Int64) -> Float32:
    return _asm([Float32], [addr], "ld.global.nc.f32 $0, [$1];", "=f,l", True)


@cute.jit
def ld_nc_v4f(addr: Int64):
    return _asm([Float32] * 4, [addr], "ld.global.nc.v4.f32 {$0, $1, $2, $3}, [$4];", "=f,=f,=f,=f,l", True)


@cute.jit
def prefetch_l2_bulk(addr: Int64, nbytes: Int32):
    """Bulk prefetch of [addr, addr + nbytes) into L2 (TMA unit; 16-byte aligned, nbytes % 16 == 0)."""
    _asm([], [addr, nbytes], "cp.async.bulk.prefetch.L2.global [$0], $1;", "l,r", True)


@cute.jit
def globaltimer() -> Int64:
    return _asm([Int64], [], "mov.u64 $0, %globaltimer;", "=l", True)


@cute.jit
def st_u64(addr: Int64, v: Int64):
    _asm([], [addr, v], "st.global.u64 [$0], $1;", "l,l", True)


@cute.jit
def rcp_approx(x: Float32) -> Float32:
    """1/x to ~1 ulp (rcp.approx.ftz): for sigmoid and renormalization, not for quantization."""
    return _asm([Float32], [x], "rcp.approx.ftz.f32 $0, $1;", "=f,f")


# ---- tensor cores (warp-level mma.sync, native on sm_90 for 16-bit inputs) ------------------------------
@cute.jit
def mma_bf16(a0: Uint32, a1: Uint32, a2: Uint32, a3: Uint32, b0: Uint32, b1: Uint32,
             c0: Float32, c1: Float32, c2: Float32, c3: Float32):
    """D = A(16x16 bf16, row) x B(16x8 bf16, col) + C, fp32 accumulate; fragments as in the PTX ISA."""
    return _asm([Float32] * 4, [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, "
                "{$8, $9}, {$10, $11, $12, $13};",
                "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")


@cute.jit
def mma_f16(a0: Uint32, a1: Uint32, a2: Uint32, a3: Uint32, b0: Uint32, b1: Uint32,
            c0: Float32, c1: Float32, c2: Float32, c3: Float32):
    return _asm([Float32] * 4, [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, "
                "{$8, $9}, {$10, $11, $12, $13};",
                "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")


@cute.jit
def e4m3x2_lo_to_f16x2(v: Uint32) -> Uint32:
    """Bytes 0, 1 of v (two e4m3) -> packed f16x2 (exact)."""
    return _asm([Uint32], [v], "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $1; cvt.rn.f16x2.e4m3x2 $0, lo; }", "=r,r")


@cute.jit
def e4m3x2_hi_to_f16x2(v: Uint32) -> Uint32:
    """Bytes 2, 3 of v -> packed f16x2 (exact)."""
    return _asm([Uint32], [v], "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $1; cvt.rn.f16x2.e4m3x2 $0, hi; }", "=r,r")


@cute.jit
def lds_v2(saddr: Int32):
    return _asm([Uint32, Uint32], [saddr], "ld.shared.v2.b32 {$0, $1}, [$2];", "=r,=r,r", True)


@cute.jit
def sts_v2(saddr: Int32, a: Uint32, b: Uint32):
    _asm([], [saddr, a, b], "st.shared.v2.b32 [$0], {$1, $2};", "r,r,r", True)


@cute.jit
def sts_v4(saddr: Int32, a: Uint32, b: Uint32, c: Uint32, d: Uint32):
    _asm([], [saddr, a, b, c, d], "st.shared.v4.b32 [$0], {$1, $2, $3, $4};", "r,r,r,r,r", True)


@cute.jit
def ld_cg_v4(addr: Int64):
    return _asm([Uint32] * 4, [addr], "ld.global.cg.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", True)


@cute.jit
def ld_cg_v2_u64(addr: Int64):
    return _asm([Int64, Int64], [addr], "ld.global.cg.v2.u64 {$0, $1}, [$2];", "=l,=l,l", True)


# ---- split-K sums in fixed point ------------------------------------------------------------------------
# Integer addition is associative, so partials added with atomics in any order give the same bits every run.
# A partial p with |p| < 2^(63 - FIX_BITS - log2(addends)) becomes round(p * 2^FIX_BITS) -- exact for
# |p| >= 2^(23 - FIX_BITS) -- and the sum, rounded once to fp32, is the fp32 rounding of the exact sum of the
# partials up to 2^-FIX_BITS absolute.
FIX_BITS = 32


@cute.jit
def f32_to_fixed(x: Float32) -> Int64:
    """round(x * 2^FIX_BITS) (the product is exact; the caller has checked the range)."""
    return _asm([Int64], [x], "{ .reg .f32 t; mul.f32 t, $1, 0f4F800000; cvt.rni.s64.f32 $0, t; }", "=l,f")


@cute.jit
def fixed_to_f32(v: Int64) -> Float32:
    """fp32(v) * 2^-FIX_BITS: one rounding (cvt.rn), then an exact scaling."""
    return _asm([Float32], [v], "{ .reg .f32 t; cvt.rn.f32.s64 t, $1; mul.f32 $0, t, 0f2F800000; }", "=f,l")


@cute.jit
def red_add_u64(addr: Int64, v: Int64):
    _asm([], [addr, v], "red.relaxed.gpu.global.add.u64 [$0], $1;", "l,l", True)


@cute.jit
def red_or_b32(addr: Int64, v: Int32):
    _asm([], [addr, v], "red.relaxed.gpu.global.or.b32 [$0], $1;", "l,r", True)


@cute.jit
def atom_cas(addr: Int64, cmp: Int32, val: Int32) -> Int32:
    return _asm([Int32], [addr, cmp, val], "atom.relaxed.gpu.global.cas.b32 $0, [$1], $2, $3;", "=r,l,r,r", True)


@cute.jit
def ld_b64(addr: Int64) -> Int64:
    return _asm([Int64], [addr], "ld.global.cg.b64 $0, [$1];", "=l,l", True)


@cute.jit
def st_sys_b32(addr: Int64, v: Int32):
    """Store to host-mapped memory (the host reads it without synchronizing)."""
    _asm([], [addr, v], "st.relaxed.sys.global.b32 [$0], $1;", "l,r", True)


@cute.jit
def fence_sys():
    _asm([], [], "fence.acq_rel.sys;", "", True)


# ---- programmatic dependent launch (PDL) -----------------------------------------------------------------
# Both are no-ops when the launch did not ask for PDL (the stage kernels, the cooperative fallback).
@cute.jit
def griddep_launch_dependents():
    """Let the next kernel in the stream be scheduled now (its CTAs take SMs as ours exit)."""
    _asm([], [], "griddepcontrol.launch_dependents;", "", True)


@cute.jit
def griddep_wait():
    """Wait until the previous kernel in the stream has completed and its writes are visible."""
    _asm([], [], "griddepcontrol.wait;", "", True)


# ---- warp votes ------------------------------------------------------------------------------------------
@cute.jit
def ballot(pred: Int32) -> Int32:
    """Bit l set where lane l's pred != 0 (full warp)."""
    return _asm([Int32], [pred], "{ .reg .pred p; setp.ne.s32 p, $1, 0; vote.sync.ballot.b32 $0, p, 0xffffffff; }",
                "=r,r", True)


@cute.jit
def warp_any(pred: Int32) -> Int32:
    """1 on every lane if pred != 0 on any lane (full warp), else 0."""
    return _asm([Int32], [pred], "{ .reg .pred p, q; setp.ne.s32 p, $1, 0; vote.sync.any.pred q, p, 0xffffffff; "
                "selp.s32 $0, 1, 0, q; }", "=r,r", True)


@cute.jit
def warp_or_b32(v: Int32) -> Int32:
    """Bitwise OR of v over the warp (redux.sync)."""
    return _asm([Int32], [v], "redux.sync.or.b32 $0, $1, 0xffffffff;", "=r,r", True)


@cute.jit
def match_any(v: Int32) -> Int32:
    """Mask of the lanes whose v equals this lane's (full warp)."""
    return _asm([Int32], [v], "match.any.sync.b32 $0, $1, 0xffffffff;", "=r,r", True)


@cute.jit
def popc(v: Int32) -> Int32:
    return _asm([Int32], [v], "popc.b32 $0, $1;", "=r,r")


@cute.jit
def lowest_bit_index(v: Int32) -> Int32:
    """Index of the lowest set bit (v != 0)."""
    return _asm([Int32], [v], "{ .reg .b32 t; brev.b32 t, $1; bfind.shiftamt.u32 $0, t; }", "=r,r")


@cute.jit
def lanemask_lt() -> Int32:
    return _asm([Int32], [], "mov.u32 $0, %lanemask_lt;", "=r", True)


@cute.jit
def atom_add_acq_rel(addr: Int64, v: Int32) -> Int32:
    return _asm([Int32], [addr, v], "atom.acq_rel.gpu.global.add.u32 $0, [$1], $2;", "=r,l,r", True)


@cute.jit
def atom_add_relaxed_u64(addr: Int64, v: Int64) -> Int64:
    return _asm([Int64], [addr, v], "atom.relaxed.gpu.global.add.u64 $0, [$1], $2;", "=l,l,l", True)


# ---- exact division without div.rn.f32 ------------------------------------------------------------------
# div.rn.f32 is a subroutine with a range check and a branch, so a chain of them cannot overlap (~0.07 us
# each in the megakernel). For the quantization's divisions the same bits come from double precision: the
# quotient of two floats with a normal result is never within 2^-49 (relative) of an fp32 rounding midpoint,
# and fl64(a) * fl64(1 / b) is within 2^-52 of a / b, so rounding it to fp32 gives exactly fl32(a / b).
# (tests/test_numerics.py checks the identity on a few million quantization-like pairs in CI; 10^8 such pairs
# and 5 * 10^6 random float pairs across exponents matched when this was written.)
def _f64_hex(x: float) -> str:
    """A double constant as PTX writes it (0d + 16 hex digits)."""
    return "0d" + struct.pack(">d", x).hex().upper()


def _f32_hex(x: float) -> str:
    """A float constant as PTX writes it (0f + 8 hex digits)."""
    return "0f" + struct.pack(">f", x).hex().upper()


R448_HEX = _f64_hex(1.0 / 448)  # 0d3F62492492492492

# A double-precision reciprocal from rcp.approx.ftz.f64 (relative error ~2^-20) and two Newton steps (error
# squares each step: ~2^-40, then rounding-limited, < 2^-51) is branch-free; rounding fl64(a) * r to fp32 then
# gives fl32(a / b) exactly for normal quotients (never within 2^-49 of an fp32 midpoint, see above).
# tests/test_numerics.py checks the margins with the reciprocal perturbed by +-2^-51.
_RCP64 = ("rcp.approx.ftz.f64 {r}, {b}; neg.f64 {n}, {b}; "
          "fma.rn.f64 {e}, {n}, {r}, 0d3FF0000000000000; fma.rn.f64 {r}, {r}, {e}, {r}; "
          "fma.rn.f64 {e}, {n}, {r}, 0d3FF0000000000000; fma.rn.f64 {r}, {r}, {e}, {r}; ")


@cute.jit
def div448(a: Float32) -> Float32:
    """fl32(a / 448) for a normal a (an FP8 group scale from its amax)."""
    return _asm([Float32], [a],
                "{ .reg .f64 t; cvt.f64.f32 t, $1; mul.rn.f64 t, t, " + R448_HEX + "; cvt.rn.f32.f64 $0, t; }",
                "=f,f")


@cute.jit
def div4_by(s: Float32, x0: Float32, x1: Float32, x2: Float32, x3: Float32):
    """fl32(x_i / s) for four values and one divisor (results normal or zero: quantization to FP8 codes)."""
    return _asm([Float32] * 4, [s, x0, x1, x2, x3],
                "{ .reg .f64 r, b, n, e, t0, t1, t2, t3; cvt.f64.f32 b, $4; " + _RCP64.format(r="r", b="b", n="n", e="e")
                + "cvt.f64.f32 t0, $5; mul.rn.f64 t0, t0, r; cvt.rn.f32.f64 $0, t0; "
                "cvt.f64.f32 t1, $6; mul.rn.f64 t1, t1, r; cvt.rn.f32.f64 $1, t1; "
                "cvt.f64.f32 t2, $7; mul.rn.f64 t2, t2, r; cvt.rn.f32.f64 $2, t2; "
                "cvt.f64.f32 t3, $8; mul.rn.f64 t3, t3, r; cvt.rn.f32.f64 $3, t3; }",
                "=f,=f,=f,=f,f,f,f,f,f")


# ---- FP8 tensor cores: warpgroup MMA (QGMMA in SASS) -------------------------------------------------------
# wgmma m64n8k32 e4m3 x e4m3 -> f32 with the weights (64 rows, A) in registers straight from global memory and
# the <= 8 tokens (B) in shared memory, described by a matrix descriptor. The four warps of a warpgroup issue it
# together (rows 16 w .. 16 w + 15 for warp w of the group). A fragment per thread (g = lane / 4, tq = lane % 4):
# a0 = row g, K 4tq..4tq+3; a1 = row g+8, same K; a2 = row g, K 16+4tq..; a3 = row g+8, K 16+4tq.. (4 e4m3 each).
# D per thread: d0, d1 = row g, tokens 2tq, 2tq+1; d2, d3 = row g+8 (the mma.sync m16n8 accumulator layout).
# B layout (no swizzle, K-major): two 8 x 16-byte core matrices (K 0-15 and K 16-31), 128 bytes apart (LBO).
WGMMA_B_STEP = 256  # bytes of B per k32 step: 8 tokens x 32 K


@cute.jit
def wgmma_desc(saddr: Int32) -> Int64:
    """Matrix descriptor of one k32 step of B at shared address saddr (16-byte aligned): start >> 4, LBO 128 B
    (K-adjacent core matrices), SBO 256 B (unused with 8 tokens), no swizzle."""
    return Int64((saddr >> 4) & 0x3FFF) | Int64((128 >> 4) << 16) | (Int64(256 >> 4) << 32)


def wgmma_e4m3(a0, a1, a2, a3, desc, d, accumulate: bool):
    """d (4 fp32) = A x B (+ d when accumulate). Asynchronous: d is valid after wgmma_commit + wgmma_wait."""
    if accumulate:
        return _asm([Float32] * 4, [d[0], d[1], d[2], d[3], a0, a1, a2, a3, desc],
                    "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {$0, $1, $2, $3}, {$8, $9, $10, $11}, "
                    "$12, 1, 1, 1;", "=f,=f,=f,=f,0,1,2,3,r,r,r,r,l", True)
    return _asm([Float32] * 4, [a0, a1, a2, a3, desc],
                "{ .reg .pred p; setp.ne.b32 p, 0, 0; wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 "
                "{$0, $1, $2, $3}, {$4, $5, $6, $7}, $8, p, 1, 1; }", "=f,=f,=f,=f,r,r,r,r,l", True)


def wgmma_fence():
    """Before the first wgmma that reads registers written by ordinary instructions."""
    _asm([], [], "wgmma.fence.sync.aligned;", "", True)


def wgmma_commit():
    _asm([], [], "wgmma.commit_group.sync.aligned;", "", True)


def wgmma_wait(vals):
    """Wait for every committed wgmma; vals (the accumulators, flat list of Float32) pass through the wait, so
    nothing reads them before it."""
    n = len(vals)
    cons = ",".join(["=f"] * n + [str(i) for i in range(n)])
    out = _asm([Float32] * n, list(vals), "wgmma.wait_group.sync.aligned 0;", cons, True)
    return [out] if n == 1 else list(out)


@cute.jit
def fence_proxy_async_smem():
    """Ordinary shared-memory stores -> visible to the async proxy (wgmma's B reads); then bar.sync."""
    _asm([], [], "fence.proxy.async.shared::cta;", "", True)


# ---- exact division and square root without IEEE subroutines (see _RCP64 above) -------------------------
def div_exact(a: Float32, b: Float32) -> Float32:
    """fl32(a / b) for finite b != 0 and a normal (or zero) quotient; b = +-inf gives a * 0 (as a / inf for
    finite a). Branch-free (div.rn.f32 is a subroutine with a range check)."""
    q = _asm([Float32], [a, b],
             "{ .reg .f64 r, bd, n, e, ad; cvt.f64.f32 bd, $2; " + _RCP64.format(r="r", b="bd", n="n", e="e")
             + "cvt.f64.f32 ad, $1; mul.rn.f64 ad, ad, r; cvt.rn.f32.f64 $0, ad; }", "=f,f,f")
    return sel_f32(is_inf(b), a * Float32(0.0), q)


# ---- exact fp32 division on the FMA pipe (megapre/device/fast_div.py says why and where it is exact) -------
@cute.jit
def div_fast(a: Float32, b: Float32) -> Float32:
    """fl32(a / b) where div_fast_ok(a, b); a = +-0 gives +-0 (the sequence's residual would turn -0 into +0)."""
    q = _asm([Float32], [a, b], fast_div.div_ptx(["$0"], ["$1"], "$2"), "=f,f,f")
    return sel_f32(a == Float32(0.0), a, q)


@cute.jit
def div_fast_ok(a: Float32, b: Float32) -> Int32:
    """1 where div_fast(a, b) is exact: 2^-60 <= |b| <= 2^60 and (a = 0 or 2^-60 <= |a| <= 2^60); 0 for any
    NaN or inf."""
    return _asm([Int32], [a, b],
                "{ .reg .f32 x, y; .reg .pred p, q; abs.f32 x, $1; abs.f32 y, $2; "
                f"setp.ge.f32 p, y, {_f32_hex(fast_div.DIV_LO)}; setp.le.and.f32 p, y, {_f32_hex(fast_div.DIV_HI)}, p; "
                f"setp.ge.f32 q, x, {_f32_hex(fast_div.DIV_LO)}; setp.eq.or.f32 q, x, 0f00000000, q; "
                f"setp.le.and.f32 q, x, {_f32_hex(fast_div.DIV_HI)}, q; and.pred p, p, q; selp.s32 $0, 1, 0, p; }}",
                "=r,f,f")


@cute.jit
def div4_by_fast(s: Float32, x0: Float32, x1: Float32, x2: Float32, x3: Float32):
    """fl32(x_i / s) for one divisor with 2^-60 <= |s| <= 2^60 (div_fast_ok(1, s)) and any finite x_i whose
    quotient is at most ~2^60: quantization to FP8 codes (|x_i| <= amax, s = amax / 448). A quotient that falls
    below the normal range (|x_i / s| < 2^-126) may be off in its last bits there, but keeps its sign: every
    such value is an e4m3 (signed) zero either way. x_i = +-0 gives +-0."""
    q = _asm([Float32] * 4, [s, x0, x1, x2, x3], fast_div.div_ptx([f"${i}" for i in range(4)],
                                                                  [f"${5 + i}" for i in range(4)], "$4"),
             "=f,=f,=f,=f,f,f,f,f,f")
    return [sel_f32(x == Float32(0.0), x, qi) for x, qi in zip((x0, x1, x2, x3), q)]


@cute.jit
def round_bf16x2(a: Float32, b: Float32):
    """(a, b) each rounded to the nearest bf16, as f32: one packed cvt (F2FP, on the ALU pipe) for two values, where
    a single cvt.rn.bf16.f32 per value is an F2F on the conversion pipe (16 per SM per clock). Same bits, NaN
    included (the same conversion; tests/test_gpu_numerics.py)."""
    return bf16x2_to_f32(f32x2_to_bf16x2(a, b))


@cute.jit
def is_inf(x: Float32) -> Int32:
    return _asm([Int32], [x], "{ .reg .pred p; testp.infinite.f32 p, $1; selp.s32 $0, 1, 0, p; }", "=r,f")


def rms_rstd(tot: Float32, h: int, eps: float) -> Float32:
    """fl32(1 / fl32(sqrt(fl32(fl32(tot / h) + eps)))) -- the IEEE chain div.rn, sqrt.rn, div.rn -- bit for bit,
    branch-free: the division by the constant h as a double multiply by fl64(1 / h); the square root in double
    (rsqrt.approx + two Newton steps + one residual correction: within ~1 ulp of double, while sqrt of an fp32
    is never within 2^-51 of an fp32 midpoint); the reciprocal as in div_exact. v = +inf gives 0 (1 / inf)."""
    v = _asm([Float32], [tot],
             "{ .reg .f64 t; cvt.f64.f32 t, $1; mul.rn.f64 t, t, " + _f64_hex(1.0 / h) + "; cvt.rn.f32.f64 $0, t; }",
             "=f,f") + Float32(eps)
    r = _asm([Float32], [v],
             "{ .reg .f64 vd, y, h, e, s, n, r; .reg .f32 sf; cvt.f64.f32 vd, $1; "
             # y ~ 1 / sqrt(v): y <- y + y / 2 (1 - v y^2), twice
             "rsqrt.approx.ftz.f64 y, vd; "
             "mul.rn.f64 s, vd, y; neg.f64 s, s; fma.rn.f64 e, s, y, 0d3FF0000000000000; "
             "mul.rn.f64 h, y, 0d3FE0000000000000; fma.rn.f64 y, h, e, y; "
             "mul.rn.f64 s, vd, y; neg.f64 s, s; fma.rn.f64 e, s, y, 0d3FF0000000000000; "
             "mul.rn.f64 h, y, 0d3FE0000000000000; fma.rn.f64 y, h, e, y; "
             # s = v y ~ sqrt(v); s <- s + (v - s^2) y / 2
             "mul.rn.f64 s, vd, y; neg.f64 n, s; fma.rn.f64 e, n, s, vd; mul.rn.f64 h, y, 0d3FE0000000000000; "
             "fma.rn.f64 s, e, h, s; cvt.rn.f32.f64 sf, s; "
             # 1 / fl32(sqrt(v))
             "cvt.f64.f32 s, sf; " + _RCP64.format(r="r", b="s", n="n", e="e") + "cvt.rn.f32.f64 $0, r; }",
             "=f,f")
    return sel_f32(is_inf(v), Float32(0.0), r)
