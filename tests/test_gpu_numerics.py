"""The megakernel's arithmetic shortcuts, checked bit for bit on the GPU against the instructions they replace
(skipped without CUDA): the PTX text of megapre/device/fast_div.py -- div.rn.f32's fast path without its branch,
which primitives.div_fast / div4_by_fast emit -- against div.rn.f32 over its range, and round_bf16x2's packed
conversion (the PTX text of megapre/device/bf16_ptx.py) against cvt.rn.bf16.f32. Run through Triton's inline
assembly (the GPU machine has no CuTe DSL)."""
from __future__ import annotations

import os

import pytest
import torch

from megapre.device import bf16_ptx, fast_div

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

N = 1 << 24


@triton.jit
def _div_kernel(a_ptr, b_ptr, fast_ptr, ieee_ptr, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i, mask=i < n)
    b = tl.load(b_ptr + i, mask=i < n)
    fast = tl.inline_asm_elementwise(FAST, "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1)
    ieee = tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True,
                                     pack=1)
    tl.store(fast_ptr + i, fast, mask=i < n)
    tl.store(ieee_ptr + i, ieee, mask=i < n)


@triton.jit
def _bf16_kernel(x_ptr, pair_ptr, single_ptr, n, PAIR: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    y = tl.load(x_ptr + (i ^ 1), mask=i < n)
    # primitives.round_bf16x2 = f32x2_to_bf16x2 then bf16x2_to_f32, in bf16_ptx's text (PAIR): (x, y) -> both rounded;
    # and the single-value rounding it replaced (cvt.rn.bf16.f32)
    lo, hi = tl.inline_asm_elementwise(PAIR, "=f,=f,f,f", [x, y], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    single = tl.inline_asm_elementwise("{ .reg .b16 h; cvt.rn.bf16.f32 h, $1; cvt.f32.bf16 $0, h; }", "=f,f", [x],
                                       dtype=tl.float32, is_pure=True, pack=1)
    tl.store(pair_ptr + i, lo, mask=i < n)
    tl.store(pair_ptr + n + i, hi, mask=i < n)
    tl.store(single_ptr + i, single, mask=i < n)


# round_bf16x2's PTX as the kernel emits it (primitives.f32x2_to_bf16x2, then bf16x2_to_f32 on the packed word)
PAIR_PTX = ("{ .reg .b32 p, t; " + bf16_ptx.F32X2_TO_BF16X2.format(out="p", lo="$2", hi="$3")
            + bf16_ptx.BF16X2_TO_F32.format(t="t", v="p", lo="$0", hi="$1") + " }")


def _divide(a, b):
    fast, ieee = torch.empty_like(a), torch.empty_like(a)
    _div_kernel[(triton.cdiv(a.numel(), 1024),)](a, b, fast, ieee, a.numel(), FAST=fast_div.div_ptx(["$0"], ["$1"], "$2"),
                                                BLOCK=1024)
    return fast, ieee


def _log_uniform(g, n, lo, hi):
    """Random signed floats with exponents uniform in [lo, hi]."""
    e = torch.randint(lo, hi + 1, (n,), generator=g, device="cuda").float()
    m = 1 + torch.rand(n, generator=g, device="cuda")
    return (m * torch.exp2(e)) * torch.where(torch.rand(n, generator=g, device="cuda") < 0.5, -1.0, 1.0)


def test_fast_division_matches_div_rn_in_range():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    g = torch.Generator(device="cuda").manual_seed(seed)
    lo, hi = fast_div.DIV_LO, fast_div.DIV_HI
    a = _log_uniform(g, N, -60, 59)
    b = _log_uniform(g, N, -60, 59).abs()
    k = N // 8
    # divisors with all-ones significands, powers of two over them (the reciprocal's hard case)
    b[:k] = (2.0 - 2.0 ** -23) * torch.exp2(torch.randint(-60, 59, (k,), generator=g, device="cuda").float())
    a[:k] = torch.exp2(torch.randint(-60, 60, (k,), generator=g, device="cuda").float())
    # SiLU: g / (1 + e^-g) over bf16 gate values
    gate = (torch.randn(k, generator=g, device="cuda") * 8).bfloat16().float()
    a[k:2 * k], b[k:2 * k] = gate, 1.0 + torch.exp(-gate)
    # FP8 quantization: x / (amax / 448) per 128-group of bf16 values of very different magnitudes
    x = (torch.randn(k // 128, 128, generator=g, device="cuda")
         * torch.exp2(torch.randint(-40, 40, (k // 128, 1), generator=g, device="cuda").float())).bfloat16().float()
    scale = (x.abs().amax(dim=1, keepdim=True).clamp_min(1e-10) / 448.0).expand_as(x)
    a[2 * k:3 * k], b[2 * k:3 * k] = x.reshape(-1), scale.reshape(-1)
    # the range's edges
    a[3 * k:3 * k + 4] = torch.tensor([lo, -lo, hi, -hi], device="cuda")
    b[3 * k:3 * k + 4] = torch.tensor([hi, lo, lo, hi], device="cuda")
    keep = (a != 0) & (a.abs() >= lo) & (a.abs() <= hi) & (b.abs() >= lo) & (b.abs() <= hi)
    a, b = a[keep].contiguous(), b[keep].contiguous()
    assert a.numel() > 0.9 * N
    fast, ieee = _divide(a, b)
    differ = (fast.view(torch.int32) != ieee.view(torch.int32)).sum().item()
    assert differ == 0, f"{differ} of {a.numel()} quotients differ from div.rn.f32"


def test_packed_bf16_rounding_matches_single():
    g = torch.Generator(device="cuda").manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = _log_uniform(g, N, -140, 127)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (N // 4,), generator=g, device="cuda", dtype=torch.int64)
    x[: N // 4] = bits.to(torch.int32).view(torch.float32)  # every bit pattern: NaN payloads, inf, subnormals
    x[N // 4: N // 4 + 6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.3895314e38],
                                         device="cuda")
    pair, single = torch.empty(2 * N, device="cuda"), torch.empty_like(x)
    _bf16_kernel[(triton.cdiv(N, 1024),)](x, pair, single, N, PAIR=PAIR_PTX, BLOCK=1024)
    partner = torch.arange(N, device="cuda") ^ 1  # the hi input of element i is x[i ^ 1] (N is even)
    assert torch.equal(pair[:N].view(torch.int32), single.view(torch.int32))
    assert torch.equal(pair[N:].view(torch.int32), single[partner].view(torch.int32))
