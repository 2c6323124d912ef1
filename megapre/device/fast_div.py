"""PTX text of div.rn.f32's fast path, without CuTe DSL: primitives.div_fast / div4_by_fast emit it in the
megakernel, and tests/test_gpu_numerics.py runs the same text through Triton on the GPU machine (where the DSL
is not installed) to check it bit for bit against div.rn.f32 and the range below.

Why: the double-precision division in primitives (div_exact / div4_by / div448) is exact but costs three f32 <->
f64 conversions and a MUFU.RCP64H per quotient, on the conversion / MUFU pipe (16 per SM per clock); the fused
act's two units per warp at M >= 5 spent ~1 us there (102 conversions per thread, session 18's SASS count).
ptxas compiles div.rn.f32 to MUFU.RCP, five FFMAs (refine the reciprocal; quotient; exact residual; corrected
quotient) and an FCHK that branches to a slow subroutine when an operand or an intermediate could leave the
normal range. The kernel runs the same MUFU.RCP + FFMA sequence without the branch and checks a range instead:
with 2^-60 <= |a|, |b| <= 2^60 every intermediate stays far inside the normal range, where the fast path is the
IEEE result. Outside it (never for real activations) the caller falls back to double precision.
"""
DIV_LO, DIV_HI = 2.0 ** -60, 2.0 ** 60  # operand magnitudes inside which the fast path is exact

# y <- 1 / b refined once; nb = -b
DIV_RCP = ("rcp.approx.ftz.f32 {y}, {b}; neg.f32 {nb}, {b}; fma.rn.f32 {e}, {nb}, {y}, 0f3F800000; "
           "fma.rn.f32 {y}, {y}, {e}, {y}; ")
# o <- a / b from y: quotient, residual a - b q (exact), corrected quotient
DIV_Q = "mul.rn.f32 {q}, {a}, {y}; fma.rn.f32 {r}, {nb}, {q}, {a}; fma.rn.f32 {o}, {y}, {r}, {q}; "


def div_ptx(outs: list[str], nums: list[str], b: str) -> str:
    """Quotients outs[i] = nums[i] / b for one divisor b (operands as PTX names or $n), the reciprocal refined
    once for all of them, in its own register scope."""
    return ("{ .reg .f32 y, nb, e, q, r; " + DIV_RCP.format(y="y", b=b, nb="nb", e="e")
            + "".join(DIV_Q.format(q="q", a=a, y="y", r="r", nb="nb", o=o) for o, a in zip(outs, nums)) + "}")
