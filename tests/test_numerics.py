"""The exact-division identity the megakernel's quantization relies on (primitives.div448 / div4_by), checked
with numpy on the CPU: for fp32 a and b with a normal (or zero) quotient, rounding fl64(a) * fl64(1 / b) to
fp32 gives exactly the IEEE fp32 quotient fl32(a / b) -- the quotient is never within 2^-49 (relative) of an
fp32 rounding midpoint, and the double-precision product is within 2^-52 of it."""
from __future__ import annotations

import numpy as np
import torch


def _bits(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32).view(np.int32)


def test_fp8_group_quantization_divisions_are_exact_in_double_precision():
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    for decade in (-30, -8, 0, 3, 25):
        # bf16 activations in 128-groups, scale = fl32(max(amax, 1e-10) / 448) as the kernel computes it
        x = (torch.randn(4000, 128, dtype=torch.float64) * 10.0 ** (decade + rng.uniform(-1, 1)))
        x = x.to(torch.bfloat16).to(torch.float32).numpy()
        x[::97, ::5] = 0.0
        amax = np.maximum(np.abs(x).max(axis=1), np.float32(1e-10)).astype(np.float32)
        scale = (amax / np.float32(448.0)).astype(np.float32)  # IEEE fp32 division (the reference)
        assert np.array_equal(_bits(scale), _bits(amax.astype(np.float64) * (1.0 / 448.0)))
        q_ref = (x / scale[:, None]).astype(np.float32)
        q_new = x.astype(np.float64) * (1.0 / scale.astype(np.float64))[:, None]
        assert np.array_equal(_bits(q_ref), _bits(q_new))


def test_random_float_pairs_across_exponents():
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    n = 1_000_000
    a = rng.standard_normal(n).astype(np.float32) * np.float32(2.0) ** rng.integers(-60, 60, n).astype(np.float32)
    b = (np.abs(rng.standard_normal(n)).astype(np.float32) + np.float32(1e-3)) \
        * np.float32(2.0) ** rng.integers(-40, 40, n).astype(np.float32)
    q_ref = (a / b).astype(np.float32)
    normal = np.isfinite(q_ref) & (np.abs(q_ref) >= np.float32(2.0 ** -126))
    q_new = a.astype(np.float64) * (1.0 / b.astype(np.float64))
    assert normal.sum() > n * 0.9
    assert np.array_equal(_bits(q_ref[normal]), _bits(q_new[normal]))
