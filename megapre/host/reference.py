"""The exact reference: plain torch, float32 / float64, on any device. Not fast; it is the definition.

Each stage is a small function with vLLM's semantics (rounding points included) so that tests can compare a
backend stage by stage. ``reference()`` chains them into a full ``PreambleOutput``.

Rounding points copied from vLLM (they decide which bf16 value a kernel must produce):
  residual = bf16(hidden + residual)                          (fused_add_rms_norm)
  x        = bf16(bf16(residual * rstd) * norm_weight)        rstd = rsqrt(mean(residual^2) + eps)
  a_scale  = max(amax_128, 1e-10) / 448, a_q = fp8(clamp(x / a_scale))   (per_token_group_quant_fp8)
             (as vLLM's CUDA kernel, whose fmaxf / fminf drop NaNs: amax over the non-NaN values, and a NaN
             quotient clamps to -448)
  gate_up  = bf16(block-scaled FP8 GEMM)                      (w8a8 block FP8 linear, bf16 out)
  h        = bf16(bf16(silu(gate)) * up)                      (silu_and_mul)
  shared   = bf16(block-scaled FP8 GEMM of quant(h))
"""
from __future__ import annotations

import torch

from ..config import FP8_E4M3_MAX, QUANT_GROUP, WEIGHT_BLOCK, PreambleConfig
from ..output import PreambleOutput
from ..weights import FP8, PreambleWeights

QUANT_EPS = 1e-10  # vLLM per_token_group_quant_fp8's amax floor (keeps all-zero groups finite)
RENORM_EPS = 1e-20  # vLLM grouped top-k: weights / (sum + 1e-20)


def add_rmsnorm(hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Returns (residual_out bf16, x bf16, rstd fp32 [M])."""
    res = (hidden.float() + residual.float()).to(torch.bfloat16)
    r64 = res.double()
    rstd = torch.rsqrt(r64.square().mean(dim=-1) + eps)
    x = (r64 * rstd[:, None]).to(torch.bfloat16)
    x = (x.double() * weight.double()).to(torch.bfloat16)
    return res, x, rstd.float()


def group_quant_fp8(x: torch.Tensor, group: int = QUANT_GROUP):
    """Per-token, per-``group`` FP8 e4m3 quantization. Returns (q fp8 [M,K], scale fp32 [M,K/group])."""
    m, k = x.shape
    xg = x.float().reshape(m, k // group, group)
    mag = xg.abs()
    # vLLM's kernel: local_absmax = fmaxf(eps, |x|...), which skips NaNs (torch's amax would propagate them)
    amax = torch.where(torch.isnan(mag), torch.zeros_like(mag), mag).amax(dim=-1).clamp_min(QUANT_EPS)
    # True IEEE division, as vLLM's kernel: torch's tensor / python-scalar on CUDA multiplies by the
    # reciprocal instead, which is one ulp off for some values (and then every code of the group can move).
    scale = amax / torch.full_like(amax, FP8_E4M3_MAX)
    q = xg / scale[..., None]
    # ... and fminf(fmaxf(q, -448), 448), which takes a NaN quotient (a NaN input, or inf / inf) to -448
    q = torch.where(torch.isnan(q), torch.full_like(q, -FP8_E4M3_MAX), q.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)).to(FP8)
    return q.reshape(m, k), scale


def dequant_groups(q: torch.Tensor, scale: torch.Tensor, group: int = QUANT_GROUP) -> torch.Tensor:
    m, k = q.shape
    return (q.double().reshape(m, k // group, group) * scale.double()[..., None]).reshape(m, k)


def dequant_weight(w: torch.Tensor, w_scale: torch.Tensor, block: int = WEIGHT_BLOCK) -> torch.Tensor:
    return w.double() * w_scale.double().repeat_interleave(block, 0).repeat_interleave(block, 1)


def block_fp8_linear(a_q, a_scale, w, w_scale) -> torch.Tensor:
    """Block-scaled FP8 GEMM, exact in float64: out[m,n] = sum_k deq(a)[m,k] * deq(w)[n,k]. Returns float64."""
    return dequant_groups(a_q, a_scale) @ dequant_weight(w, w_scale).T


def router_logits(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    return (x.double() @ gate_weight.double().T).float()


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    i = gate_up.shape[-1] // 2
    g, u = gate_up[..., :i].float(), gate_up[..., i:]
    act = (g / (1.0 + torch.exp(-g))).to(torch.bfloat16)
    return (act.float() * u.float()).to(torch.bfloat16)


def _sanitize(b: torch.Tensor) -> torch.Tensor:
    # NaN never wins a comparison in vLLM's kernel: treat it as -inf.
    return torch.where(torch.isnan(b), torch.full_like(b, float("-inf")), b)


def biased_scores(logits: torch.Tensor, bias: torch.Tensor):
    """(s, b): s = sigmoid(logits) (float64), b = s + bias with NaN -> -inf (used only for selection)."""
    s = torch.sigmoid(logits.double())
    return s, _sanitize(s + bias.double())


def _topk_lower_index(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim, best first, equal values broken toward lower index."""
    order = torch.sort(v, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def group_scores(b: torch.Tensor, config: PreambleConfig) -> torch.Tensor:
    """[..., n_group]: each group's score, the sum of its two best biased scores (-inf if a group has fewer than
    two finite scores)."""
    bg = b.reshape(*b.shape[:-1], config.n_group, config.experts_per_group)
    return _sanitize(torch.sort(bg, dim=-1, descending=True).values[..., :2].sum(-1))


def grouped_topk(logits: torch.Tensor, bias: torch.Tensor, config: PreambleConfig):
    """DeepSeek-V3 noaux_tc routing. Returns (topk_weights fp32 [M,k], topk_ids int32 [M,k])."""
    cfg = config
    m = logits.shape[0]
    s, b = biased_scores(logits, bias)
    group_score = group_scores(b, cfg)
    sel_groups = _topk_lower_index(group_score, cfg.topk_group)
    keep = torch.zeros(m, cfg.n_group, dtype=torch.bool, device=logits.device)
    keep.scatter_(1, sel_groups, True)
    kept = keep.repeat_interleave(cfg.experts_per_group, 1)
    # Experts of kept groups rank above all others, even at b = -inf (an underfull row still picks from the
    # kept groups): order by (kept, b, -index), as the kernels' integer keys do.
    by_score = torch.sort(b, dim=-1, descending=True, stable=True).indices
    by_kept = torch.sort(torch.gather(kept, 1, by_score).to(torch.int8), dim=-1, descending=True, stable=True).indices
    ids = torch.gather(by_score, 1, by_kept)[:, : cfg.top_k]
    w = torch.gather(s, 1, ids)
    w = w / (w.sum(-1, keepdim=True) + RENORM_EPS)
    # vLLM's fallback: with no finite group score there is nothing to rank; experts 0..k-1, equal weights.
    dead = ~torch.isfinite(group_score).any(-1)
    if bool(dead.any()):
        ids = torch.where(dead[:, None], torch.arange(cfg.top_k, device=ids.device).expand(m, -1), ids)
        w = torch.where(dead[:, None], torch.full_like(w, 1.0 / cfg.top_k), w)
    if cfg.fold_routed_scaling:
        w = w * cfg.routed_scaling_factor
    return w.float(), ids.to(torch.int32)


def moe_align_block_size(topk_ids: torch.Tensor, config: PreambleConfig):
    """Token sorting for the fused-MoE kernel over the experts local to ``config.ep_rank``.

    Flat ids t * top_k + k routed to local expert e are listed contiguously, ascending, each expert's list
    padded with the sentinel M * top_k to a multiple of BLOCK_M; experts in local order. Pairs routed to
    other ranks are left out. Returns (sorted_token_ids, expert_ids, num_tokens_post_padded), int32.
    """
    cfg = config
    m = topk_ids.shape[0]
    p, bs, nl = m * cfg.top_k, cfg.moe_block_size, cfg.n_local_experts
    dev = topk_ids.device
    local = topk_ids.reshape(-1).long() - cfg.first_local_expert
    flat = torch.arange(p, device=dev)
    valid = (local >= 0) & (local < nl)
    lv, fv = local[valid], flat[valid]
    counts = torch.bincount(lv, minlength=nl)
    padded = (counts + bs - 1) // bs * bs
    offsets = torch.cumsum(padded, 0) - padded
    starts = torch.cumsum(counts, 0) - counts
    key = lv * p + fv
    order = torch.argsort(key)
    lv_s, fv_s = lv[order], fv[order]
    rank = torch.arange(lv_s.numel(), device=dev) - starts[lv_s]
    sorted_ids = torch.full((cfg.max_num_tokens_padded(m),), p, dtype=torch.int32, device=dev)
    sorted_ids[offsets[lv_s] + rank] = fv_s.to(torch.int32)
    expert_ids = torch.full((cfg.max_num_blocks(m),), -1, dtype=torch.int32, device=dev)
    blocks = torch.repeat_interleave(torch.arange(nl, device=dev), padded // bs)
    expert_ids[: blocks.numel()] = blocks.to(torch.int32)
    ntpp = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, expert_ids, ntpp


def shared_expert(a_q, a_scale, weights: PreambleWeights):
    """Returns (shared_out bf16 [M,H], gate_up bf16 [M,2I_l], h bf16 [M,I_l])."""
    gate_up = block_fp8_linear(a_q, a_scale, weights.w13, weights.w13_scale).to(torch.bfloat16)
    h = silu_and_mul(gate_up)
    h_q, h_s = group_quant_fp8(h)
    out = block_fp8_linear(h_q, h_s, weights.w2, weights.w2_scale).to(torch.bfloat16)
    return out, gate_up, h


def reference(hidden: torch.Tensor, residual: torch.Tensor, weights: PreambleWeights,
              *, intermediates: dict | None = None) -> PreambleOutput:
    """Every output of one pre-amble call. ``intermediates``, if given, receives x, rstd, gate_up, h."""
    cfg = weights.config
    res, x, rstd = add_rmsnorm(hidden, residual, weights.norm_weight, cfg.rms_norm_eps)
    logits = router_logits(x, weights.gate_weight)
    topk_w, topk_ids = grouped_topk(logits, weights.e_score_correction_bias, cfg)
    a_q, a_scale = group_quant_fp8(x)
    shared, gate_up, h = shared_expert(a_q, a_scale, weights)
    sorted_ids, expert_ids, ntpp = moe_align_block_size(topk_ids, cfg)
    if intermediates is not None:
        intermediates.update(x=x, rstd=rstd, gate_up=gate_up, h=h)
    return PreambleOutput(residual=res, router_logits=logits, topk_weights=topk_w, topk_ids=topk_ids,
                          a_q=a_q, a_scale=a_scale, shared_out=shared, sorted_token_ids=sorted_ids,
                          expert_ids=expert_ids, num_tokens_post_padded=ntpp)
