"""The exact reference (megapre.host.reference) against the naive per-token formulations in tests/naive.py.

Every test draws fresh random inputs; the seed is printed (shown by pytest on failure) and can be pinned
with MEGAPRE_TEST_SEED=<seed>.
"""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from megapre import PreambleConfig, PreambleWeights, output_spec
from megapre.host import reference as ref
from megapre.weights import FP8, quantize_fp8_blocks

from .naive import (naive_add_rmsnorm, naive_group_quant_fp8, naive_grouped_topk, naive_grouped_topk_row,
                   naive_moe_align, naive_underfull)

NAN, INF = float("nan"), float("inf")

# Routing shapes: DeepSeek-V3, the small non-DeepSeek config, two-expert groups (top_k = every kept expert),
# and topk_group == n_group (no group is dropped).
DS = PreambleConfig.deepseek_v3()
SMALL = PreambleConfig(hidden_size=256, n_routed_experts=64, n_group=4, topk_group=2, top_k=6,
                       shared_intermediate_size=256)
PAIRS = PreambleConfig(hidden_size=256, n_routed_experts=16, n_group=8, topk_group=2, top_k=4,
                       shared_intermediate_size=256)
ALLGROUPS = PreambleConfig(hidden_size=256, n_routed_experts=32, n_group=4, topk_group=4, top_k=8,
                           shared_intermediate_size=256)
ROUTING_CONFIGS = [DS, SMALL, PAIRS, ALLGROUPS]
ROUTING_IDS = ["deepseek", "small", "pairs", "allgroups"]


@pytest.fixture
def seed():
    s = int(os.environ.get("MEGAPRE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={s}  (rerun with MEGAPRE_TEST_SEED={s})")
    return s


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_bias(cfg, g, std=0.03):
    return torch.randn(cfg.n_routed_experts, generator=g) * std


# ---- grouped top-k ---------------------------------------------------------------------------------------
def compare_topk(logits, bias, cfg, seed, *, allow_underfull=False):
    """reference.grouped_topk == naive, row by row. An underfull row (kept groups hold fewer than top_k
    non-NaN experts) must pick its -inf experts from the kept groups too, lower index first, and has NaN
    weights; allow_underfull=False asserts that the generator produced none."""
    w, ids = ref.grouped_topk(logits, bias, cfg)
    m = logits.shape[0]
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert tuple(w.shape) == (m, cfg.top_k) and tuple(ids.shape) == (m, cfg.top_k)
    rows, bl = logits.tolist(), bias.tolist()
    nw, nids = naive_grouped_topk(rows, bl, cfg.n_group, cfg.topk_group, cfg.top_k, cfg.fold_routed_scaling,
                                  cfg.routed_scaling_factor)
    for t in range(m):
        ctx = f"seed={seed} cfg={cfg.short_name()} row={t} logits={rows[t]} bias={bl}"
        got_ids = ids[t].tolist()
        assert got_ids == nids[t], f"ids {got_ids} != naive {nids[t]}; " + ctx
        if naive_underfull(rows[t], bl, cfg.n_group, cfg.topk_group, cfg.top_k):
            assert allow_underfull, "test generator produced an underfull row: " + ctx
            assert torch.isnan(w[t]).all(), ctx
            continue
        want = torch.tensor(nw[t], dtype=torch.float64).float()
        torch.testing.assert_close(w[t], want, rtol=3e-7, atol=1e-30, equal_nan=True, msg=lambda s: s + "\n" + ctx)


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("cfg", ROUTING_CONFIGS, ids=ROUTING_IDS)
def test_grouped_topk_random(cfg, fold, seed):
    g = gen(seed)
    cfg = cfg.replace(fold_routed_scaling=fold)
    for m in (1, 2, 3, 5, 8, 64):
        std = float(torch.empty(1).uniform_(0.3, 4.0, generator=g))
        logits = torch.randn(m, cfg.n_routed_experts, generator=g) * std
        compare_topk(logits, rand_bias(cfg, g), cfg, seed)
    # realistic logits from a real-magnitude router: x ~ RMSNorm output, gate std 0.02
    logits = (torch.randn(8, cfg.hidden_size, generator=g) @ (torch.randn(cfg.n_routed_experts, cfg.hidden_size,
                                                                         generator=g) * 0.02).T)
    compare_topk(logits, rand_bias(cfg, g), cfg, seed)


def _tie_lattice():
    # non-negative values only (so no s(a) + s(-a) = 1 coincidence), plus +-inf: s in {0, 0.5, ..., 1}.
    # Distinct top-2 multisets then have group scores far apart, so every tie is exact in any arithmetic.
    vals = [0.0, 0.25, 1.0, 2.5, 4.0]
    sums = sorted(1 / (1 + math.exp(-a)) + 1 / (1 + math.exp(-b)) for a, b in itertools.combinations_with_replacement(vals, 2))
    assert min(b - a for a, b in zip(sums, sums[1:])) > 1e-3
    return torch.tensor(vals + [INF, -INF])


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("cfg", ROUTING_CONFIGS, ids=ROUTING_IDS)
def test_grouped_topk_planted_ties(cfg, fold, seed):
    g = gen(seed)
    cfg = cfg.replace(fold_routed_scaling=fold)
    e, ng, epg = cfg.n_routed_experts, cfg.n_group, cfg.experts_per_group
    lattice = _tie_lattice()
    for m in (1, 4, 8, 64):
        # few distinct values -> many equal experts inside and across groups
        n_vals = int(torch.randint(2, 5, (1,), generator=g))
        pick = lattice[torch.randperm(lattice.numel(), generator=g)[:n_vals]]
        logits = pick[torch.randint(0, n_vals, (m, e), generator=g)]
        # whole groups copied onto other groups (equal group scores, equal experts across groups)
        lg = logits.view(m, ng, epg)
        for t in range(m):
            src, dst = torch.randint(0, ng, (2,), generator=g).tolist()
            lg[t, dst] = lg[t, src]
        # a repeated maximum inside a group counts twice
        lg[0, 0, :2] = lattice[4]
        for bias_value in (0.0, 0.0125):
            bias = torch.full((e,), bias_value)
            compare_topk(logits, bias, cfg, seed)
    # every expert equal: groups 0..topk_group-1, experts in index order
    logits = torch.full((2, e), 1.0)
    w, ids = ref.grouped_topk(logits, torch.zeros(e), cfg)
    assert ids.tolist() == [list(range(cfg.top_k))] * 2
    compare_topk(logits, torch.zeros(e), cfg, seed)


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("cfg", ROUTING_CONFIGS, ids=ROUTING_IDS)
def test_grouped_topk_nan_rows(cfg, fold, seed):
    g = gen(seed)
    cfg = cfg.replace(fold_routed_scaling=fold)
    e, ng, epg, k = cfg.n_routed_experts, cfg.n_group, cfg.experts_per_group, cfg.top_k
    m = 16
    logits = torch.randn(m, e, generator=g) * 2
    lg = logits.view(m, ng, epg)
    logits[0] = NAN                                              # all NaN -> fallback
    logits[1, torch.rand(e, generator=g) < 0.1] = NAN            # a few NaNs
    logits[2, torch.rand(e, generator=g) < 0.3] = NAN
    lg[3, 0] = NAN                                               # a whole group NaN
    lg[4, :, 1:] = NAN                                           # one finite per group -> no finite group score
    lg[5, :, 0] = NAN                                            # the first expert of every group NaN
    logits[6, 0] = NAN
    lg[7, :ng - cfg.topk_group] = NAN                            # exactly topk_group groups survive
    logits[8] = NAN
    logits[8, :2] = 1.0                                          # one finite group score only
    # (row 8 can be underfull when a group has fewer than top_k experts: checked separately below)
    lg[9, :, 1:] = NAN
    lg[9, -1, -1] = 0.5                                          # last group alone has a finite score
    w, ids = ref.grouped_topk(logits, rand_bias(cfg, g), cfg)
    assert ((ids >= 0) & (ids < e)).all()
    bias = rand_bias(cfg, g)
    compare_topk(logits, bias, cfg, seed, allow_underfull=True)
    w, ids = ref.grouped_topk(logits, bias, cfg)
    scale = cfg.routed_scaling_factor if fold else 1.0
    for t in (0, 4):  # fallback rows
        assert ids[t].tolist() == list(range(k))
        torch.testing.assert_close(w[t], torch.full((k,), scale / k))
    for t in (1, 2, 3, 5, 6, 7):  # rows with enough finite experts: finite weights summing to 1 (or scale)
        if naive_underfull(logits[t].tolist(), bias.tolist(), ng, cfg.topk_group, k):
            continue
        assert torch.isfinite(w[t]).all()
        torch.testing.assert_close(w[t].double().sum(), torch.tensor(scale, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("cfg", ROUTING_CONFIGS, ids=ROUTING_IDS)
def test_grouped_topk_mostly_nan_rows(cfg, seed):
    """Random rows with most logits NaN (many underfull rows, some dead rows): every row as naive."""
    g = gen(seed)
    m = 64
    logits = torch.randn(m, cfg.n_routed_experts, generator=g)
    p_nan = 1 - 0.5 * torch.rand(m, 1, generator=g) ** 2  # in (0.5, 1], skewed towards 1
    logits[torch.rand(m, cfg.n_routed_experts, generator=g) < p_nan] = NAN
    compare_topk(logits, rand_bias(cfg, g), cfg, seed, allow_underfull=True)
    compare_topk(logits, torch.zeros(cfg.n_routed_experts), cfg.replace(fold_routed_scaling=True), seed,
                 allow_underfull=True)


@pytest.mark.parametrize("cfg", [DS, SMALL, ALLGROUPS.replace(topk_group=2)], ids=["deepseek", "small", "ktop2"])
def test_grouped_topk_underfull_picks_stay_in_kept_groups(cfg, seed):
    """Kept groups with fewer than top_k non-NaN experts: the remaining picks are -inf experts; they must
    still come from kept groups (ties -> lower index among them)."""
    e, ng, epg = cfg.n_routed_experts, cfg.n_group, cfg.experts_per_group
    logits = torch.full((1, e), NAN)
    # the last two groups each have exactly two finite experts (their last two); the others are all NaN
    for grp in (ng - 2, ng - 1):
        logits[0, grp * epg + epg - 2: grp * epg + epg] = torch.tensor([1.0, 2.0])
    bias = torch.zeros(e)
    assert naive_underfull(logits[0].tolist(), bias.tolist(), ng, cfg.topk_group, cfg.top_k)
    _, ids = ref.grouped_topk(logits, bias, cfg)
    _, nids = naive_grouped_topk_row(logits[0].tolist(), bias.tolist(), ng, cfg.topk_group, cfg.top_k, False, 1.0)
    # the two finite groups, then -inf groups by lower index until topk_group groups are kept
    kept = {ng - 2, ng - 1} | set(range(max(0, cfg.topk_group - 2)))
    assert all(i // epg in kept for i in ids[0].tolist()), f"ids {ids[0].tolist()} leave kept groups {kept}"
    assert ids[0].tolist() == nids


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("cfg", ROUTING_CONFIGS, ids=ROUTING_IDS)
def test_grouped_topk_inf_logits(cfg, fold, seed):
    g = gen(seed)
    cfg = cfg.replace(fold_routed_scaling=fold)
    e = cfg.n_routed_experts
    m = 12
    logits = torch.randn(m, e, generator=g) * 3
    logits[0] = INF
    logits[1] = -INF                      # every s = 0: selection by bias, weights 0 / (0 + 1e-20) = 0
    logits[2, torch.rand(e, generator=g) < 0.2] = INF
    logits[3, torch.rand(e, generator=g) < 0.5] = -INF
    mask = torch.rand(e, generator=g)
    logits[4, mask < 0.3] = INF
    logits[4, mask > 0.7] = -INF
    logits[5] = torch.where(torch.rand(e, generator=g) < 0.5, torch.tensor(INF), torch.tensor(-INF))
    logits[6, :3] = torch.tensor([1e30, -1e30, 88.0])
    logits[7] = torch.tensor([60.0, INF]).repeat(e // 2)  # s == 1 exactly for both
    compare_topk(logits, rand_bias(cfg, g), cfg, seed)
    compare_topk(logits, torch.zeros(e), cfg, seed)
    w, ids = ref.grouped_topk(logits, torch.zeros(e), cfg)
    assert (w[1] == 0).all()
    assert not torch.isnan(w).any()


# ---- moe_align_block_size --------------------------------------------------------------------------------
def _routed_ids(cfg, m, g):
    logits = torch.randn(m, cfg.n_routed_experts, generator=g) * 2
    return ref.grouped_topk(logits, rand_bias(cfg, g), cfg)[1]


def compare_align(topk_ids, cfg, seed):
    sid, eid, ntpp = ref.moe_align_block_size(topk_ids, cfg)
    m = topk_ids.shape[0]
    ns, ne, nt = naive_moe_align(topk_ids.tolist(), cfg.n_routed_experts, cfg.ep_size, cfg.ep_rank,
                                 cfg.moe_block_size)
    ctx = f"seed={seed} cfg={cfg.short_name()} m={m}"
    assert sid.dtype == eid.dtype == ntpp.dtype == torch.int32, ctx
    assert tuple(sid.shape) == (cfg.max_num_tokens_padded(m),), ctx
    assert tuple(eid.shape) == (cfg.max_num_blocks(m),), ctx
    assert tuple(ntpp.shape) == (1,), ctx
    assert ntpp.item() == nt, ctx
    assert eid.tolist() == ne, ctx
    assert sid.tolist() == ns, ctx


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("base", [DS, SMALL, PAIRS], ids=["deepseek", "small", "pairs"])
def test_moe_align_every_rank(base, block, seed):
    g = gen(seed)
    for ep in (1, 2, 4, 8):
        for m in (1, 3, 8, 64):
            cfg0 = base.replace(ep_size=ep, ep_rank=0, moe_block_size=block)
            routed = _routed_ids(cfg0, m, g)
            # arbitrary ids (repeats allowed) and a skewed batch: every pair on two experts
            arbitrary = torch.randint(0, base.n_routed_experts, (m, base.top_k), generator=g, dtype=torch.int32)
            skew = torch.randint(0, 2, (m, base.top_k), generator=g, dtype=torch.int32) * (base.n_routed_experts - 1)
            for rank in range(ep):
                cfg = cfg0.replace(ep_rank=rank)
                for ids in (routed, arbitrary, skew):
                    compare_align(ids, cfg, seed)


def test_moe_align_no_local_pairs(seed):
    cfg = SMALL.replace(ep_size=4, ep_rank=3, moe_block_size=32)
    ids = torch.zeros(5, cfg.top_k, dtype=torch.int32)  # all on expert 0 (rank 0)
    sid, eid, ntpp = ref.moe_align_block_size(ids, cfg)
    assert ntpp.item() == 0
    assert (sid == 5 * cfg.top_k).all() and (eid == -1).all()
    compare_align(ids, cfg, seed)


# ---- add + RMSNorm, FP8 quantization, block FP8 linear ----------------------------------------------------
@pytest.mark.parametrize("h", [256, 7168])
def test_add_rmsnorm(h, seed):
    g = gen(seed)
    eps = 1e-6
    for m, scale in ((1, 1.0), (5, 30.0), (8, 1e-3)):
        hidden = (torch.randn(m, h, generator=g) * scale).to(torch.bfloat16)
        residual = (torch.randn(m, h, generator=g) * scale * 4).to(torch.bfloat16)
        if m > 1:
            residual[1] = -hidden[1]  # residual row exactly 0 -> rstd = 1/sqrt(eps), x = 0
        weight = (1.0 + torch.randn(h, generator=g) * 0.25).abs().to(torch.bfloat16)
        res, x, rstd = ref.add_rmsnorm(hidden, residual, weight, eps)
        nres, nx, nrstd = naive_add_rmsnorm(hidden, residual, weight, eps)
        assert res.dtype == x.dtype == torch.bfloat16 and rstd.dtype == torch.float32
        assert torch.equal(res, nres), f"seed={seed} m={m}"
        assert torch.equal(x, nx), f"seed={seed} m={m}"
        torch.testing.assert_close(rstd, torch.tensor(nrstd, dtype=torch.float64).float(), rtol=1e-6, atol=0)
        if m > 1:
            assert (res[1] == 0).all() and (x[1] == 0).all()


def test_group_quant_fp8(seed):
    g = gen(seed)
    m, k = 6, 1024
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, k // 128, 1, generator=g) * 3).repeat_interleave(
        128, 1).reshape(m, k)
    x = x.to(torch.bfloat16)
    x[0, :128] = 0                       # all-zero group -> scale 1e-10 / 448, q = 0
    x[1, 128:256] = 0
    x[1, 200] = -3.5                     # single nonzero element
    q, s = ref.group_quant_fp8(x)
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert tuple(q.shape) == (m, k) and tuple(s.shape) == (m, k // 128)
    nq, ns = naive_group_quant_fp8(x)
    assert torch.equal(s, ns), f"seed={seed}"
    assert torch.equal(q.view(torch.uint8), nq.view(torch.uint8)), f"seed={seed}"
    # formula checks
    xd = x.double().reshape(m, k // 128, 128)
    amax = xd.abs().amax(-1)
    assert torch.equal(s, (amax.clamp_min(1e-10) / 448.0).float())
    assert s[0, 0].item() == pytest.approx(1e-10 / 448.0, rel=1e-6)
    qd = q.double().reshape(m, k // 128, 128)
    assert (qd[0, 0] == 0).all()
    nonzero = amax > 0
    assert (qd.abs().amax(-1)[nonzero] == 448.0).all()
    deq = qd * s.double()[..., None]
    err = (deq - xd).abs()
    bound = torch.maximum(xd.abs() * 2.0 ** -4, s.double()[..., None] * 2.0 ** -10) * 1.0001
    assert (err <= bound).all(), f"seed={seed}"
    torch.testing.assert_close(ref.dequant_groups(q, s), deq.reshape(m, k), rtol=0, atol=0)


def test_group_quant_fp8_nonfinite_as_vllm():
    """vLLM's per_token_group_quant_8bit kernel: absmax = fmaxf(eps, |x|...) skips NaNs, and q = fminf(fmaxf(x / s,
    -448), 448) takes a NaN quotient to -448 (fmaxf returns its non-NaN operand); torch's amax and clamp would
    propagate the NaN instead."""
    x = torch.zeros(3, 256)
    x[0, :128] = float("nan")            # a group of NaNs (a row whose rstd is NaN): scale from eps, every code -448
    x[0, 128:] = torch.linspace(-2, 2, 128)
    x[1, :128] = torch.linspace(-3, 3, 128)
    x[1, 5] = float("nan")               # one NaN among finite values: the scale is the finite values' (3 / 448)
    x[2, 7] = float("inf")               # inf: scale inf, finite / inf = 0, inf / inf = NaN -> -448
    x[2, 9] = -5.0
    x = x.to(torch.bfloat16)
    q, s = ref.group_quant_fp8(x)
    nq, ns = naive_group_quant_fp8(x)
    assert torch.equal(s, ns) and torch.equal(q.view(torch.uint8), nq.view(torch.uint8))
    codes = q.view(torch.uint8)
    neg448 = torch.tensor(-448.0).to(FP8).view(torch.uint8).item()
    assert s[0, 0].item() == pytest.approx(1e-10 / 448.0, rel=1e-6) and (codes[0, :128] == neg448).all()
    assert s[1, 0].item() == pytest.approx(3.0 / 448.0, rel=1e-6) and codes[1, 5].item() == neg448
    assert q[1, 127].float().item() == 448.0  # (the finite values quantize as without the NaN)
    assert s[2, 0].item() == float("inf") and codes[2, 7].item() == neg448
    assert q[2, 9].float().item() == 0.0 and not torch.isnan(q.float()).any()


def _loop_dequant(w, scale, block=128):
    n, k = w.shape
    out = torch.empty(n, k, dtype=torch.float64)
    for i in range(n // block):
        for j in range(k // block):
            out[i * block:(i + 1) * block, j * block:(j + 1) * block] = (
                w[i * block:(i + 1) * block, j * block:(j + 1) * block].double() * float(scale[i, j]))
    return out


def test_block_fp8_linear(seed):
    g = gen(seed)
    m, n, k = 5, 384, 512
    x = (torch.randn(m, k, generator=g) * 2).to(torch.bfloat16)
    a_q, a_s = ref.group_quant_fp8(x)
    wf = torch.randn(n, k, generator=g) * 0.02 * (1 + 3 * torch.rand(n, 1, generator=g))
    w, w_s = quantize_fp8_blocks(wf)
    assert w.dtype == FP8 and tuple(w_s.shape) == (n // 128, k // 128)
    wd = _loop_dequant(w, w_s)
    assert torch.equal(ref.dequant_weight(w, w_s), wd)
    ad = torch.empty(m, k, dtype=torch.float64)
    for t in range(m):
        for j in range(k // 128):
            ad[t, j * 128:(j + 1) * 128] = a_q[t, j * 128:(j + 1) * 128].double() * float(a_s[t, j])
    want = ad @ wd.T
    got = ref.block_fp8_linear(a_q, a_s, w, w_s)
    assert got.dtype == torch.float64 and tuple(got.shape) == (m, n)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # one element by a plain Python sum
    t, c = int(torch.randint(0, m, (1,), generator=g)), int(torch.randint(0, n, (1,), generator=g))
    acc = math.fsum(ad[t, i].item() * wd[c, i].item() for i in range(k))
    assert got[t, c].item() == pytest.approx(acc, rel=1e-12, abs=1e-12)
    # dequantized weights are close to the float weights they came from
    torch.testing.assert_close(wd, wf.double(), rtol=0.07, atol=wf.abs().max().item() / 448 / 2 ** 9 * 4)


# ---- full reference(): output spec and invariants ---------------------------------------------------------
_WEIGHTS: dict = {}


def _weights(cfg: PreambleConfig) -> PreambleWeights:
    key = cfg.replace(ep_rank=0, ep_size=1, fold_routed_scaling=False, moe_block_size=16)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = PreambleWeights.random(key, seed=1234)
    base = _WEIGHTS[key]
    return PreambleWeights(cfg, **base.tensors())


def check_invariants(out, hidden, residual, weights, seed):
    cfg = weights.config
    m = hidden.shape[0]
    ctx = f"seed={seed} cfg={cfg.short_name()} m={m}"
    spec = output_spec(cfg, m)
    assert [n for n, _ in out.items()] == list(spec), ctx
    for name, (dtype, shape) in spec.items():
        t = getattr(out, name)
        assert t.dtype == dtype and tuple(t.shape) == shape, f"{name}: {t.dtype} {list(t.shape)}; {ctx}"
    # residual and activations
    assert torch.equal(out.residual, (hidden.double() + residual.double()).to(torch.bfloat16)), ctx
    # routing
    ids, w = out.topk_ids.long(), out.topk_weights
    assert ((ids >= 0) & (ids < cfg.n_routed_experts)).all(), ctx
    for t in range(m):
        assert len(set(ids[t].tolist())) == cfg.top_k, ctx
        kept_groups = {i // cfg.experts_per_group for i in ids[t].tolist()}
        assert len(kept_groups) <= cfg.topk_group, ctx
    target = cfg.routed_scaling_factor if cfg.fold_routed_scaling else 1.0
    torch.testing.assert_close(w.double().sum(-1), torch.full((m,), target, dtype=torch.float64), rtol=1e-6, atol=0)
    assert (w > 0).all(), ctx
    nw, nids = naive_grouped_topk(out.router_logits.tolist(), weights.e_score_correction_bias.tolist(), cfg.n_group,
                                  cfg.topk_group, cfg.top_k, cfg.fold_routed_scaling, cfg.routed_scaling_factor)
    assert ids.tolist() == nids, ctx
    # sorting: every local pair exactly once, nothing else but the sentinel
    sid, eid, ntpp = out.sorted_token_ids.tolist(), out.expert_ids.tolist(), out.num_tokens_post_padded.item()
    p, bs, first, nl = m * cfg.top_k, cfg.moe_block_size, cfg.first_local_expert, cfg.n_local_experts
    flat = ids.reshape(-1).tolist()
    local_pairs = [i for i in range(p) if 0 <= flat[i] - first < nl]
    real = [v for v in sid if v != p]
    assert sorted(real) == local_pairs, ctx
    assert ntpp % bs == 0 and ntpp <= len(sid), ctx
    assert all(v == p for v in sid[ntpp:]), ctx
    n_used = ntpp // bs
    assert all(v == -1 for v in eid[n_used:]), ctx
    assert eid[:n_used] == sorted(eid[:n_used]), ctx  # experts in increasing local order
    for blk in range(n_used):
        e = eid[blk]
        assert 0 <= e < nl, ctx
        block = sid[blk * bs:(blk + 1) * bs]
        assert any(v != p for v in block), f"block {blk} is all padding; {ctx}"
        for v in block:
            assert v == p or flat[v] - first == e, f"block {blk} of expert {e} holds pair {v}; {ctx}"
        real_in_block = [v for v in block if v != p]
        assert real_in_block == sorted(real_in_block), ctx
        # padding only at the end of an expert's run
        pad_at = [i for i, v in enumerate(block) if v == p]
        if pad_at:
            assert pad_at == list(range(pad_at[0], bs)), ctx
            assert blk + 1 == n_used or eid[blk + 1] != e, ctx
    ns, ne, nt = naive_moe_align(ids.tolist(), cfg.n_routed_experts, cfg.ep_size, cfg.ep_rank, bs)
    assert (sid, eid, ntpp) == (ns, ne, nt), ctx
    # quantized activations and the shared expert agree with the stage functions
    inter = {}
    ref.reference(hidden, residual, weights, intermediates=inter)
    x = inter["x"]
    nres, nx, _ = naive_add_rmsnorm(hidden, residual, weights.norm_weight, cfg.rms_norm_eps)
    assert torch.equal(x, nx) and torch.equal(out.residual, nres), ctx
    torch.testing.assert_close(out.router_logits, (x.double() @ weights.gate_weight.double().T).float(), rtol=0, atol=0)
    nq, ns_ = naive_group_quant_fp8(x)
    assert torch.equal(out.a_q.view(torch.uint8), nq.view(torch.uint8)) and torch.equal(out.a_scale, ns_), ctx
    gate_up = (out.a_q.double().reshape(m, -1, 128) * out.a_scale.double()[..., None]).reshape(m, -1) @ \
        _loop_dequant(weights.w13, weights.w13_scale).T
    assert torch.equal(inter["gate_up"], gate_up.to(torch.bfloat16)), ctx
    il = cfg.shared_local_intermediate
    gu = inter["gate_up"].double()
    act = (gu[:, :il] * torch.sigmoid(gu[:, :il])).to(torch.bfloat16).double()
    torch.testing.assert_close(inter["h"].double(), (act * gu[:, il:]).to(torch.bfloat16).double(), rtol=2 ** -7,
                               atol=1e-30)
    hq, hs = naive_group_quant_fp8(inter["h"])
    shared = (hq.double().reshape(m, -1, 128) * hs.double()[..., None]).reshape(m, -1) @ \
        _loop_dequant(weights.w2, weights.w2_scale).T
    assert torch.equal(out.shared_out, shared.to(torch.bfloat16)), ctx
    assert torch.isfinite(out.shared_out.float()).all() and out.shared_out.float().abs().max() > 0, ctx


def _inputs(cfg, m, g):
    hidden = (torch.randn(m, cfg.hidden_size, generator=g) * 0.5).to(torch.bfloat16)
    residual = (torch.randn(m, cfg.hidden_size, generator=g) * 2).to(torch.bfloat16)
    return hidden, residual


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("ep", [(1, 0, 16), (2, 1, 32), (4, 2, 64), (8, 7, 16)])
def test_reference_small_invariants(ep, fold, seed):
    g = gen(seed)
    ep_size, ep_rank, bs = ep
    cfg = SMALL.replace(ep_size=ep_size, ep_rank=ep_rank, moe_block_size=bs, fold_routed_scaling=fold)
    weights = _weights(cfg)
    for m in (1, 3, 8, 64):
        hidden, residual = _inputs(cfg, m, g)
        out = ref.reference(hidden, residual, weights)
        check_invariants(out, hidden, residual, weights, seed)


def test_reference_small_tp2(seed):
    g = gen(seed)
    for r in (0, 1):
        cfg = SMALL.replace(shared_intermediate_size=512, shared_tp_size=2, shared_tp_rank=r)
        weights = _weights(cfg)
        hidden, residual = _inputs(cfg, 4, g)
        check_invariants(ref.reference(hidden, residual, weights), hidden, residual, weights, seed)


@pytest.mark.parametrize("m", [1, 8])
def test_reference_deepseek_ep8(m, seed):
    g = gen(seed)
    rank = int(torch.randint(0, 8, (1,), generator=g))
    cfg = PreambleConfig.deepseek_v3_ep8(ep_rank=rank)
    weights = _weights(cfg)
    hidden, residual = _inputs(cfg, m, g)
    out = ref.reference(hidden, residual, weights)
    check_invariants(out, hidden, residual, weights, seed)
    # the other ranks route identically and sort only their own experts
    for r in range(8):
        c = cfg.replace(ep_rank=r)
        compare_align(out.topk_ids, c, seed)


def test_reference_nonfinite_inputs(seed):
    g = gen(seed)
    cfg = SMALL
    weights = _weights(cfg)
    hidden, residual = _inputs(cfg, 4, g)
    hidden[0, 3] = NAN
    hidden[1, 7] = INF
    residual[2, :] = 0
    hidden[2, :] = 0
    out = ref.reference(hidden, residual, weights)
    ids = out.topk_ids
    assert ((ids >= 0) & (ids < cfg.n_routed_experts)).all()
    assert ids[0].tolist() == list(range(cfg.top_k)) and ids[1].tolist() == list(range(cfg.top_k))
    assert torch.isfinite(out.router_logits[3]).all() and torch.isfinite(out.topk_weights[3]).all()
    assert (out.router_logits[2] == 0).all() and (out.a_q[2].float() == 0).all()
    ns, ne, nt = naive_moe_align(ids.tolist(), cfg.n_routed_experts, 1, 0, cfg.moe_block_size)
    assert out.sorted_token_ids.tolist() == ns and out.expert_ids.tolist() == ne
