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


# ---- primitives.div_fast / div4_by_fast: div.rn.f32's fast path without its guard ------------------------
F32 = np.float32


def _fma32(x, y, z):
    """fl32(x * y + z) with one rounding (fma.rn.f32), exactly: the product of two floats is exact in double,
    the sum's error is recovered with TwoSum, and an fp32 tie of the rounded sum is broken by that error."""
    p = x.astype(np.float64) * y.astype(np.float64)
    z = z.astype(np.float64)
    s = p + z
    bb = s - p
    err = (p - (s - bb)) + (z - bb)  # p + z = s + err exactly
    t = s.astype(F32)
    d = s - t.astype(np.float64)
    other = t.astype(np.float64) + 2.0 * d  # the other fp32 neighbour when s is an fp32 midpoint
    tie = (d != 0) & (other.astype(F32).astype(np.float64) == other)
    flip = tie & (err != 0) & (np.sign(err) == np.sign(d))
    return np.where(flip, other.astype(F32), t)


def _div_fast(a, b, y0):
    """The sequence primitives.div_fast issues (ptxas's div.rn.f32 fast path), from a reciprocal guess y0."""
    nb = -b
    e = _fma32(nb, y0, np.ones_like(b))
    y = _fma32(y0, e, y0)
    q = (a.astype(np.float64) * y.astype(np.float64)).astype(F32)  # mul.rn.f32 (a product of floats: one rounding)
    r = _fma32(nb, q, a)
    return _fma32(y, r, q)


def _rcp_guesses(b):
    """The correctly rounded reciprocal, and 1 and 2 ulps off either way."""
    y = (1.0 / b.astype(np.float64)).astype(F32)
    out = [y]
    for direction in (np.inf, -np.inf):
        z = y
        for _ in range(2):
            z = np.nextafter(z, F32(direction))
            out.append(z)
    return out


def _in_range(a, b):
    """Operands moved into primitives.div_fast_ok's range (|a|, |b| in [2^-60, 2^60], a != 0)."""
    a = np.where(a == 0, F32(1.0), a)
    a = np.where(np.abs(a) < F32(2.0 ** -60), np.copysign(F32(2.0 ** -60), a), a)
    return a, np.clip(b, F32(2.0 ** -60), F32(2.0 ** 60))


def test_fp32_division_fast_path_is_exact_in_range():
    """The sequence of primitives.div_fast (fast_div.py: ptxas's div.rn.f32 fast path) gives fl32(a / b) for |a|, |b|
    in [2^-60, 2^60] -- random pairs across exponents, powers of two over divisors with all-ones significands (the
    hard case), SiLU's g / (1 + e^-g), the FP8 quantization's x / scale -- from the correctly rounded reciprocal,
    and from one 1 or 2 ulps off wherever the divisor's significand is not all ones. (MUFU.RCP's own results are
    what div.rn.f32 relies on; tests/test_gpu_numerics.py checks the sequence on the GPU against div.rn.f32.)"""
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    n = 200_000
    a = (rng.standard_normal(n) * 2.0 ** rng.integers(-59, 59, n)).astype(F32)
    b = (np.abs(rng.standard_normal(n)) * 2.0 ** rng.integers(-59, 59, n)).astype(F32)
    k = n // 8
    a[:k] = F32(2.0) ** rng.integers(-59, 59, k).astype(F32)
    b[:k] = (F32(2.0) - F32(2.0) ** -23) * F32(2.0) ** rng.integers(-59, 59, k).astype(F32)
    g = (torch.randn(2 * k, dtype=torch.float64) * 6).to(torch.bfloat16).float().numpy()
    a[k:3 * k], b[k:3 * k] = g, F32(1.0) + np.exp(-g).astype(F32)
    x = (torch.randn(2 * k, dtype=torch.float64) * 10.0 ** rng.uniform(-8, 8)).to(torch.bfloat16).float().numpy()
    a[3 * k:5 * k], b[3 * k:5 * k] = x, (np.maximum(np.abs(x).max(), F32(1e-10)) / F32(448.0)).astype(F32)
    a, b = _in_range(a, b)
    ref = _bits((a / b).astype(F32))
    all_ones = (b.view(np.int32) & 0x7FFFFF) == 0x7FFFFF
    assert all_ones.sum() >= k
    for i, y0 in enumerate(_rcp_guesses(b)):
        got = _bits(_div_fast(a, b, y0))
        assert np.array_equal(got[~all_ones], ref[~all_ones]), i
        if i == 0:
            assert np.array_equal(got, ref)


def test_fp32_division_fast_path_tiny_quotients_keep_their_sign():
    """div4_by_fast with x far below the group's scale (x possibly subnormal, outside div_fast_ok's range for a):
    the quotient keeps x's sign and stays below 2 |x / s| + 2^-126 -- so wherever |x / s| < 2^-11 the e4m3 code is
    a zero of x's sign, as the exact quotient's would be (the kernel checks only the scale's range)."""
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    n = 100_000
    s = (np.abs(rng.standard_normal(n)) * 2.0 ** rng.integers(-40, 40, n)).astype(F32) + F32(2.0 ** -40)
    x = (rng.standard_normal(n) * s.astype(np.float64) * 2.0 ** rng.integers(-190, -11, n)).astype(F32)
    x[x == 0] = F32(-(2.0 ** -149))
    exact = np.abs(x.astype(np.float64) / s.astype(np.float64))
    sig = (s.view(np.int32) & 0x7FFFFF) != 0x7FFFFF
    for y0 in _rcp_guesses(s):
        q = _div_fast(x, s, y0)[sig]
        assert np.all(np.signbit(q) == np.signbit(x[sig]))
        assert np.all(np.abs(q.astype(np.float64)) <= 2 * exact[sig] + 2.0 ** -126)
