"""PreambleWeights (random, from_hf_state_dict, validation) and PreambleConfig's rules."""
from __future__ import annotations

import os

import pytest
import torch

from megapre import PreambleConfig, PreambleWeights
from megapre.weights import FP8, quantize_fp8_blocks, weight_spec

SMALL = PreambleConfig(hidden_size=256, n_routed_experts=16, n_group=4, topk_group=2, top_k=4,
                       shared_intermediate_size=512)


@pytest.fixture
def seed():
    s = int(os.environ.get("MEGAPRE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={s}  (rerun with MEGAPRE_TEST_SEED={s})")
    return s


def _expected_spec(cfg):
    h, e, il = cfg.hidden_size, cfg.n_routed_experts, cfg.shared_local_intermediate
    return {
        "norm_weight": (torch.bfloat16, (h,)),
        "gate_weight": (torch.bfloat16, (e, h)),
        "e_score_correction_bias": (torch.float32, (e,)),
        "w13": (FP8, (2 * il, h)),
        "w13_scale": (torch.float32, (2 * il // 128, h // 128)),
        "w2": (FP8, (h, il)),
        "w2_scale": (torch.float32, (h // 128, il // 128)),
    }


def _deq(w, s):
    return w.double() * s.double().repeat_interleave(128, 0).repeat_interleave(128, 1)


# ---- random ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [SMALL, SMALL.replace(shared_tp_size=2, shared_tp_rank=1),
                                 PreambleConfig.deepseek_v3_ep8(ep_rank=3)], ids=["small", "small-tp2", "ds-ep8"])
def test_random_shapes_dtypes_magnitudes(cfg, seed):
    w = PreambleWeights.random(cfg, seed=seed)
    assert w.config is cfg
    assert w.device == torch.device("cpu")
    spec = _expected_spec(cfg)
    assert {n: (d, s) for n, (d, s) in weight_spec(cfg).items()} == spec
    for name, (dtype, shape) in spec.items():
        t = getattr(w, name)
        assert t.dtype == dtype and tuple(t.shape) == shape, name
        assert t.is_contiguous(), name
        assert torch.isfinite(t.float()).all(), name
    assert set(w.tensors()) == set(spec)
    # magnitudes of a real DeepSeek-V3 layer
    norm = w.norm_weight.float()
    assert (norm >= 0).all() and 0.8 < norm.mean() < 1.2 and 0.15 < norm.std() < 0.35
    gate = w.gate_weight.float()
    assert 0.017 < gate.std() < 0.023 and abs(gate.mean()) < 2e-3
    bias = w.e_score_correction_bias
    assert bias.abs().max() < 0.3 and 0.005 < bias.std() < 0.08
    for q, s in ((w.w13, w.w13_scale), (w.w2, w.w2_scale)):
        assert (s > 0).all() and torch.isfinite(s).all()
        assert not torch.isnan(q.float()).any()
        d = _deq(q, s)
        assert 0.02 < d.std() < 0.1, d.std()
        # every 128x128 block uses the full FP8 range (scale = amax / 448)
        blocks = q.float().abs().reshape(q.shape[0] // 128, 128, q.shape[1] // 128, 128).amax(dim=(1, 3))
        assert (blocks == 448).all()
        assert s.unique().numel() > 1  # one scale per block, not one per tensor


def test_random_deterministic(seed):
    a = PreambleWeights.random(SMALL, seed=seed)
    b = PreambleWeights.random(SMALL, seed=seed)
    c = PreambleWeights.random(SMALL, seed=seed + 1)
    for name in PreambleWeights.TENSOR_FIELDS:
        ta, tb, tc = getattr(a, name), getattr(b, name), getattr(c, name)
        assert torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)), name
        assert not torch.equal(ta.view(torch.uint8), tc.view(torch.uint8)), name


def test_quantize_fp8_blocks(seed):
    g = torch.Generator().manual_seed(seed)
    wf = torch.randn(256, 384, generator=g) * 0.05
    wf[:128, :128] *= 100
    q, s = quantize_fp8_blocks(wf)
    assert q.dtype == FP8 and s.dtype == torch.float32 and tuple(s.shape) == (2, 3)
    amax = wf.abs().reshape(2, 128, 3, 128).amax(dim=(1, 3))
    torch.testing.assert_close(s, amax / 448, rtol=1e-6, atol=0)
    d = _deq(q, s)
    assert ((d - wf.double()).abs() <= wf.double().abs() * 2 ** -4 + s.max().item() * 2 ** -10).all()


# ---- validation ------------------------------------------------------------------------------------------
def test_constructor_validates():
    w = PreambleWeights.random(SMALL, seed=0)
    t = w.tensors()
    bad = dict(t, gate_weight=t["gate_weight"].float())
    with pytest.raises(ValueError, match="gate_weight") as ei:
        PreambleWeights(SMALL, **bad)
    assert "torch.bfloat16" in str(ei.value) and "torch.float32" in str(ei.value)
    bad = dict(t, w2_scale=t["w2_scale"][:, :1].contiguous())
    with pytest.raises(ValueError, match="w2_scale"):
        PreambleWeights(SMALL, **bad)
    bad = dict(t, w13=t["w13"].t().contiguous().t())
    with pytest.raises(ValueError, match="w13.*contiguous"):
        PreambleWeights(SMALL, **bad)
    bad = dict(t, e_score_correction_bias=t["e_score_correction_bias"].tolist())
    with pytest.raises(TypeError, match="e_score_correction_bias"):
        PreambleWeights(SMALL, **bad)
    bad = dict(t, w2_scale=t["w2_scale"].to("meta"))  # one tensor on another device
    with pytest.raises(ValueError, match="w2_scale.*meta"):
        PreambleWeights(SMALL, **bad)
    # weights of one config do not validate against another
    with pytest.raises(ValueError):
        PreambleWeights(SMALL.replace(shared_tp_size=2), **t)
    with pytest.raises(TypeError, match="config"):
        PreambleWeights("not a config", **t)


# ---- from_hf_state_dict ----------------------------------------------------------------------------------
HF_CFG = PreambleConfig(hidden_size=256, n_routed_experts=16, n_group=4, topk_group=2, top_k=4,
                        shared_intermediate_size=512)


def _hf_state_dict(cfg, layer, g):
    h, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.shared_intermediate_size
    p = f"model.layers.{layer}."
    se = p + "mlp.shared_experts."

    def fp8(n, k):
        q, s = quantize_fp8_blocks(torch.randn(n, k, generator=g) * 0.02 * (1 + 3 * torch.rand(n, 1, generator=g)))
        return q, s

    gq, gs = fp8(i, h)
    uq, us = fp8(i, h)
    dq, ds = fp8(h, i)
    sd = {
        p + "post_attention_layernorm.weight": (1 + torch.randn(h, generator=g) * 0.2).to(torch.bfloat16),
        p + "mlp.gate.weight": (torch.randn(e, h, generator=g) * 0.02).to(torch.bfloat16),
        p + "mlp.gate.e_score_correction_bias": torch.randn(e, generator=g) * 0.03,
        se + "gate_proj.weight": gq, se + "gate_proj.weight_scale_inv": gs,
        se + "up_proj.weight": uq, se + "up_proj.weight_scale_inv": us,
        se + "down_proj.weight": dq, se + "down_proj.weight_scale_inv": ds,
    }
    return sd


def _eq(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_from_hf_state_dict_slicing(tp, seed):
    g = torch.Generator().manual_seed(seed)
    layer = 5
    sd = _hf_state_dict(HF_CFG, layer, g)
    # other layers' tensors and unrelated keys are ignored
    other = {k.replace(f"layers.{layer}.", "layers.6."): v.clone() for k, v in _hf_state_dict(HF_CFG, 6, g).items()}
    sd.update(other)
    sd["model.layers.5.mlp.experts.0.gate_proj.weight"] = torch.zeros(3)
    p, se = f"model.layers.{layer}.", f"model.layers.{layer}.mlp.shared_experts."
    il = HF_CFG.shared_intermediate_size // tp
    for r in range(tp):
        cfg = HF_CFG.replace(shared_tp_size=tp, shared_tp_rank=r)
        w = PreambleWeights.from_hf_state_dict(sd, layer, cfg)
        assert w.config == cfg
        assert _eq(w.norm_weight, sd[p + "post_attention_layernorm.weight"])
        assert _eq(w.gate_weight, sd[p + "mlp.gate.weight"])
        assert _eq(w.e_score_correction_bias, sd[p + "mlp.gate.e_score_correction_bias"])
        rows = range(r * il, (r + 1) * il)
        srow = range(r * il // 128, (r + 1) * il // 128)
        gate, up = sd[se + "gate_proj.weight"], sd[se + "up_proj.weight"]
        gs, us = sd[se + "gate_proj.weight_scale_inv"], sd[se + "up_proj.weight_scale_inv"]
        down, ds = sd[se + "down_proj.weight"], sd[se + "down_proj.weight_scale_inv"]
        want_w13 = torch.stack([gate[j] for j in rows] + [up[j] for j in rows])
        want_w13_s = torch.stack([gs[j] for j in srow] + [us[j] for j in srow])
        want_w2 = torch.stack([down[:, j] for j in rows], dim=1)
        want_w2_s = torch.stack([ds[:, j] for j in srow], dim=1)
        assert _eq(w.w13, want_w13), f"rank {r}"
        assert _eq(w.w13_scale, want_w13_s), f"rank {r}"
        assert _eq(w.w2, want_w2), f"rank {r}"
        assert _eq(w.w2_scale, want_w2_s), f"rank {r}"
        for name, t in w.tensors().items():
            assert t.is_contiguous(), name
        # dequantized shard == the same shard of the dequantized full weights
        full_gate = _deq(gate, gs)
        torch.testing.assert_close(_deq(w.w13, w.w13_scale)[:il], full_gate[r * il:(r + 1) * il], rtol=0, atol=0)
        full_down = _deq(down, ds)
        torch.testing.assert_close(_deq(w.w2, w.w2_scale), full_down[:, r * il:(r + 1) * il], rtol=0, atol=0)
    # the shards of all ranks put back together give the full down projection
    parts = [PreambleWeights.from_hf_state_dict(sd, layer, HF_CFG.replace(shared_tp_size=tp, shared_tp_rank=r)).w2
             for r in range(tp)]
    assert _eq(torch.cat(parts, dim=1), sd[se + "down_proj.weight"])


HF_NAMES = ["post_attention_layernorm.weight", "mlp.gate.weight", "mlp.gate.e_score_correction_bias",
            "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.gate_proj.weight_scale_inv",
            "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.up_proj.weight_scale_inv",
            "mlp.shared_experts.down_proj.weight", "mlp.shared_experts.down_proj.weight_scale_inv"]


@pytest.mark.parametrize("short", HF_NAMES)
def test_from_hf_state_dict_missing(short):
    g = torch.Generator().manual_seed(0)
    sd = _hf_state_dict(HF_CFG, 2, g)
    name = "model.layers.2." + short
    t = sd.pop(name)
    with pytest.raises(ValueError) as ei:
        PreambleWeights.from_hf_state_dict(sd, 2, HF_CFG)
    msg = str(ei.value)
    assert name in msg and "missing" in msg
    assert str(t.dtype) in msg and str(list(t.shape)) in msg  # what was expected
    # the tensor of another layer does not stand in for it
    sd["model.layers.3." + short] = t
    with pytest.raises(ValueError, match="missing"):
        PreambleWeights.from_hf_state_dict(sd, 2, HF_CFG)


@pytest.mark.parametrize("short", HF_NAMES)
def test_from_hf_state_dict_misshaped_and_wrong_dtype(short):
    g = torch.Generator().manual_seed(0)
    sd = _hf_state_dict(HF_CFG, 0, g)
    name = "model.layers.0." + short
    good = sd[name]
    # wrong shape: one more row
    bigger = torch.cat([good, good[:1]]) if good.dim() else good
    with pytest.raises(ValueError) as ei:
        PreambleWeights.from_hf_state_dict(dict(sd, **{name: bigger}), 0, HF_CFG)
    msg = str(ei.value)
    assert name in msg and str(list(good.shape)) in msg and str(list(bigger.shape)) in msg, msg
    # the right shape for a TP shard is still the wrong shape: full tensors are expected
    if "shared_experts" in short and not short.startswith("mlp.shared_experts.down"):
        half = good[: good.shape[0] // 2]
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            PreambleWeights.from_hf_state_dict(dict(sd, **{name: half}), 0, HF_CFG.replace(shared_tp_size=2))
    # wrong dtype
    other = torch.float16 if good.dtype != torch.float16 else torch.float32
    wrong = good.float().to(other)
    with pytest.raises(ValueError) as ei:
        PreambleWeights.from_hf_state_dict(dict(sd, **{name: wrong}), 0, HF_CFG)
    msg = str(ei.value)
    assert name in msg and str(good.dtype) in msg and str(other) in msg, msg
    # not a tensor at all
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        PreambleWeights.from_hf_state_dict(dict(sd, **{name: good.tolist()}), 0, HF_CFG)


def test_from_hf_state_dict_config_mismatch():
    g = torch.Generator().manual_seed(0)
    sd = _hf_state_dict(HF_CFG, 0, g)
    with pytest.raises(ValueError, match="mlp.gate.weight"):
        PreambleWeights.from_hf_state_dict(sd, 0, HF_CFG.replace(n_routed_experts=32, n_group=4))
    with pytest.raises(ValueError, match="shared_experts"):
        PreambleWeights.from_hf_state_dict(sd, 0, HF_CFG.replace(shared_intermediate_size=256))


# ---- PreambleConfig rules --------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, field", [
    (dict(hidden_size=0), "hidden_size"),
    (dict(hidden_size=-128), "hidden_size"),
    (dict(hidden_size=7168.0), "hidden_size"),
    (dict(top_k=True), "top_k"),
    (dict(hidden_size=7000), "hidden_size"),             # not a multiple of 128
    (dict(n_group=7), "n_group"),                        # does not divide 256
    (dict(n_group=256), "n_group"),                      # one expert per group
    (dict(topk_group=9), "topk_group"),                  # > n_group
    (dict(topk_group=1, top_k=33), "top_k"),             # > topk_group * experts_per_group = 32
    (dict(top_k=129), "top_k"),                          # > 4 * 32
    (dict(ep_size=3), "ep_size"),
    (dict(ep_size=8, ep_rank=8), "ep_rank"),
    (dict(ep_rank=-1), "ep_rank"),
    (dict(shared_tp_size=32), "shared_tp_size"),         # 2048 / 32 = 64, not a multiple of 128
    (dict(shared_tp_size=3), "shared_tp_size"),
    (dict(shared_tp_size=2, shared_tp_rank=2), "shared_tp_rank"),
    (dict(moe_block_size=24), "moe_block_size"),
    (dict(moe_block_size=0), "moe_block_size"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    (dict(routed_scaling_factor=-2.5), "routed_scaling_factor"),
    (dict(n_routed_experts=0), "n_routed_experts"),
    (dict(shared_intermediate_size=100), "shared_tp_size"),
])
def test_config_invalid(changes, field):
    with pytest.raises(ValueError, match=rf"PreambleConfig\.{field}="):
        PreambleConfig(**changes)


def test_config_valid_and_derived():
    c = PreambleConfig.deepseek_v3_ep8(ep_rank=5)
    assert (c.ep_size, c.ep_rank, c.shared_tp_size, c.shared_tp_rank) == (8, 5, 8, 5)
    assert c.n_local_experts == 32 and c.first_local_expert == 160 and c.shared_local_intermediate == 256
    assert c.experts_per_group == 32 and c.hidden_groups == 56
    # max_num_tokens_padded: pairs + local experts * (BLOCK_M - 1), capped at pairs * BLOCK_M
    assert c.max_num_tokens_padded(1) == 8 * 16
    assert c.max_num_tokens_padded(64) == 512 + 32 * 15
    assert c.max_num_blocks(64) == -(-(512 + 32 * 15) // 16)
    small = PreambleConfig(hidden_size=256, n_routed_experts=64, n_group=4, topk_group=2, top_k=6,
                           shared_intermediate_size=256, moe_block_size=64)
    assert small.max_num_blocks(3) == -(-min(18 * 64, 18 + 64 * 63) // 64)
    with pytest.raises(Exception):
        c.ep_rank = 1  # frozen
    assert c.replace(ep_rank=1).ep_rank == 1
    assert hash(c) == hash(PreambleConfig.deepseek_v3_ep8(ep_rank=5))
    with pytest.raises(ValueError, match="ep_rank"):
        c.replace(ep_rank=8)
