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


def _ulps(x: np.ndarray, k: int) -> np.ndarray:
    """x moved by k double-precision ulps (the error budget of the kernel's Newton-refined approximations)."""
    for _ in range(abs(k)):
        x = np.nextafter(x, np.inf if k > 0 else -np.inf)
    return x


def test_division_margin_with_an_approximate_reciprocal():
    """primitives.div_exact / div4_by: a reciprocal from rcp.approx + two Newton steps is within ~1-2 ulps of
    double (not correctly rounded); rounding a * r to fp32 must still give the IEEE quotient. Checked with the
    reciprocal off by up to 3 ulps either way."""
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    n = 400_000
    a = rng.standard_normal(n).astype(np.float32) * np.float32(2.0) ** rng.integers(-40, 40, n).astype(np.float32)
    b = (np.abs(rng.standard_normal(n)).astype(np.float32) + np.float32(1e-3)) \
        * np.float32(2.0) ** rng.integers(-30, 30, n).astype(np.float32)
    b[: n // 4] = (1.0 + np.exp(-rng.standard_normal(n // 4) * 8)).astype(np.float32)  # SiLU's 1 + e^-g
    q_ref = (a / b).astype(np.float32)
    r = 1.0 / b.astype(np.float64)
    for k in (-3, -1, 1, 3):
        assert np.array_equal(_bits(q_ref), _bits(a.astype(np.float64) * _ulps(r, k))), k


def test_rms_rstd_chain_in_double_precision():
    """primitives.rms_rstd: fl32(1 / fl32(sqrt(fl32(fl32(tot / H) + eps)))) from a double-precision square root
    and reciprocal that are each a few ulps off, for H = 7168 and eps = 1e-6 (DeepSeek-V3)."""
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    n = 400_000
    h, eps = 7168, np.float32(1e-6)
    tot = (np.abs(rng.standard_normal(n)) * 10.0 ** rng.uniform(-12, 12, n)).astype(np.float32)
    v_ref = ((tot / np.float32(h)).astype(np.float32) + eps).astype(np.float32)
    v_new = ((tot.astype(np.float64) * (1.0 / h)).astype(np.float32) + eps).astype(np.float32)
    assert np.array_equal(_bits(v_ref), _bits(v_new))
    s_ref = np.sqrt(v_ref).astype(np.float32)
    rstd_ref = (np.float32(1.0) / s_ref).astype(np.float32)
    for k in (-3, 3):
        s = _ulps(np.sqrt(v_new.astype(np.float64)), k).astype(np.float32)
        assert np.array_equal(_bits(s_ref), _bits(s)), k
        rstd = _ulps(1.0 / s.astype(np.float64), -k).astype(np.float32)
        assert np.array_equal(_bits(rstd_ref), _bits(rstd)), k
