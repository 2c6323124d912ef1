"""Fuzz of megapre.run (issue 6, point 5): random configs (every EP rank of EP 1/2/4/8/16, block sizes
16/32/64/128), token counts from 0 to above the maximum, dtypes, shapes, strides, devices and values (NaN,
Inf, huge, denormal, all-equal router scores). Each case must give the right answer or a clear
TypeError/ValueError before anything is written; never a crash, an out-of-range id, or a modified input.

Runs on the CPU (reference and unfused backends) in CI; on a GPU machine the same cases also run the GPU
backends for shapes they support."""
from __future__ import annotations

import os
import random

import pytest
import torch

import megapre
from megapre import PreambleConfig, PreambleOutput, PreambleWeights

from .naive import naive_grouped_topk, naive_moe_align

N_CASES = int(os.environ.get("MEGAPRE_FUZZ_CASES", "160"))
_weights: dict = {}


def _weights_for(cfg):
    key = cfg.replace(ep_rank=0, moe_block_size=16, fold_routed_scaling=False)
    if key not in _weights:
        _weights[key] = PreambleWeights.random(key, seed=3)
    w = _weights[key]
    return PreambleWeights(cfg, **w.tensors())


def _random_config(rng: random.Random) -> PreambleConfig:
    ep = rng.choice([1, 2, 4, 8, 16])
    return PreambleConfig(hidden_size=256, n_routed_experts=64, n_group=4, topk_group=2, top_k=6,
                          shared_intermediate_size=256, ep_size=ep, ep_rank=rng.randrange(ep),
                          moe_block_size=rng.choice([16, 32, 64, 128]),
                          fold_routed_scaling=rng.random() < 0.3)


def _values(rng: random.Random, g: torch.Generator, m: int, h: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    kind = rng.choice(["normal", "nan", "inf", "huge", "denormal", "equal", "zero"])
    hidden = torch.randn(m, h, generator=g) * rng.choice([0.01, 1.0, 30.0])
    residual = torch.randn(m, h, generator=g)
    if kind == "nan":
        hidden[rng.randrange(m), rng.randrange(h)] = float("nan")
    elif kind == "inf":
        residual[rng.randrange(m), rng.randrange(h)] = rng.choice([float("inf"), float("-inf")])
    elif kind == "huge":
        hidden[rng.randrange(m)] *= 1e36  # bf16 max is ~3.4e38: squares overflow fp32 -> rstd 0 / NaN
    elif kind == "denormal":
        hidden = hidden * 1e-39
        residual = residual * 1e-39
    elif kind == "equal":  # identical tokens (all-equal per token is the zero case)
        hidden[:] = hidden[0]
        residual[:] = residual[0]
    elif kind == "zero":  # x = 0 -> every logit equal -> selection purely by bias and index
        hidden.zero_()
        residual.zero_()
    return hidden.to(torch.bfloat16), residual.to(torch.bfloat16), kind


def _check_right(out: PreambleOutput, cfg: PreambleConfig, m: int, ctx: str):
    ids = out.topk_ids
    assert ((ids >= 0) & (ids < cfg.n_routed_experts)).all(), f"{ctx}: id out of range"
    nw, nid = naive_grouped_topk(out.router_logits.double().tolist(), _weights_for(cfg).e_score_correction_bias
                                 .double().tolist(), cfg.n_group, cfg.topk_group, cfg.top_k,
                                 cfg.fold_routed_scaling, cfg.routed_scaling_factor)
    assert ids.tolist() == nid, f"{ctx}: routing differs from the naive formulation"
    torch.testing.assert_close(out.topk_weights.double(), torch.tensor(nw, dtype=torch.float64), rtol=1e-5,
                               atol=1e-6, equal_nan=True, msg=lambda s: f"{ctx}: {s}")
    ns, ne, nt = naive_moe_align(ids.tolist(), cfg.n_routed_experts, cfg.ep_size, cfg.ep_rank,
                                 cfg.moe_block_size)
    assert out.sorted_token_ids.tolist() == ns and out.expert_ids.tolist() == ne, f"{ctx}: sorting differs"
    assert out.num_tokens_post_padded.item() == nt, f"{ctx}: num_tokens_post_padded differs"
    valid = out.sorted_token_ids[out.sorted_token_ids < m * cfg.top_k]
    assert valid.unique().numel() == valid.numel(), f"{ctx}: a pair appears twice"


def _bad_inputs(rng, g, cfg, hidden, residual):
    """One way to get the arguments wrong, with the exception it must raise."""
    m, h = hidden.shape
    kind = rng.choice(["dtype", "shape", "stride", "device", "m0", "mbig", "weights", "out"])
    if kind == "dtype":
        return hidden.to(rng.choice([torch.float16, torch.float32])), residual, None, TypeError
    if kind == "shape":
        return hidden[:, : h - 128], residual, None, ValueError
    if kind == "stride":
        wide = torch.zeros(m, 2 * h, dtype=torch.bfloat16)
        wide[:, ::2] = hidden
        return wide[:, ::2], residual, None, ValueError
    if kind == "device":
        return hidden.to("meta"), residual, None, ValueError
    if kind == "m0":
        return hidden[:0], residual[:0], None, ValueError
    if kind == "mbig":
        big = megapre.MAX_TOKENS + 1
        return torch.zeros(big, h, dtype=torch.bfloat16), torch.zeros(big, h, dtype=torch.bfloat16), None, ValueError
    if kind == "weights":
        return hidden, residual, "weights", ValueError
    out = PreambleOutput.empty(cfg, m)
    out.topk_ids = torch.empty(m, cfg.top_k + 1, dtype=torch.int32)
    return hidden, residual, out, ValueError


@pytest.mark.parametrize("chunk", range(4))
def test_fuzz_run(chunk):
    seed = int(os.environ.get("MEGAPRE_TEST_SEED") or int.from_bytes(os.urandom(4), "little")) + chunk
    print(f"seed={seed}")
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for case in range(N_CASES // 4):
        cfg = _random_config(rng)
        w = _weights_for(cfg)
        m = rng.choice([1, 2, 3, 5, 8, 13, 64])
        hidden, residual, kind = _values(rng, g, m, cfg.hidden_size)
        backend = rng.choice(["reference", "unfused"])
        ctx = f"seed {seed} case {case}: {cfg.short_name()} M={m} values={kind} backend={backend}"
        h0, r0 = hidden.clone(), residual.clone()
        if rng.random() < 0.35:
            bh, br, bout, exc = _bad_inputs(rng, g, cfg, hidden, residual)
            weights = w
            if bout == "weights":
                weights, bout = _weights_for(cfg.replace(top_k=4)), None
            out = bout if bout is not None else PreambleOutput.empty(cfg, max(1, bh.shape[0])).poison()
            before = [t.clone() for _, t in out.items()] if out is not None else None
            with pytest.raises(exc):
                megapre.run(bh, br, weights, backend=backend,
                            out=out if (bout is not None or bh.shape[0] == out.residual.shape[0]) else None)
            if bout is None and before is not None:
                for (_, t), t0 in zip(out.items(), before):  # bytes: the NaN poison must be untouched
                    assert torch.equal(t.view(torch.uint8), t0.view(torch.uint8)), \
                        f"{ctx}: an output was written before the error"
        else:
            out = megapre.run(hidden, residual, w, backend=backend)
            _check_right(out, cfg, m, ctx)
        assert torch.equal(hidden.view(torch.int16), h0.view(torch.int16)), f"{ctx}: hidden modified"
        assert torch.equal(residual.view(torch.int16), r0.view(torch.int16)), f"{ctx}: residual modified"
