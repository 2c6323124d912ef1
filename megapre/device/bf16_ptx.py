"""PTX text of the packed bf16 conversions, without CuTe DSL: primitives.f32x2_to_bf16x2 / bf16x2_to_f32 emit it in
the megakernel, and tests/test_gpu_numerics.py runs the same text through Triton on the GPU machine (where the DSL
is not installed) against the single-value cvt.rn.bf16.f32, so a change here cannot pass that test unnoticed.

Why packed: one cvt.rn.bf16x2.f32 rounds two floats on the ALU pipe (F2FP), where two cvt.rn.bf16.f32 are two F2Fs
on the conversion pipe (16 per SM per clock), which the fused act's math was bound by (session 18).
"""
# two f32 -> one b32 holding bf16(lo) in its low half and bf16(hi) in its high half (round to nearest even)
F32X2_TO_BF16X2 = "cvt.rn.bf16x2.f32 {out}, {hi}, {lo};"
# one b32 of two bf16 -> two f32 (exact: a bf16 is the upper half of an f32), using scratch b32 register {t}
BF16X2_TO_F32 = "shl.b32 {t}, {v}, 16; mov.b32 {lo}, {t}; and.b32 {t}, {v}, 0xffff0000; mov.b32 {hi}, {t};"
