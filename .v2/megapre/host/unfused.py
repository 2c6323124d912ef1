"""The unfused backend: the pre-amble as separate kernels, the way an engine runs it today.

On CUDA it launches seven Triton kernels (see triton_kernels.py); this is the fallback of the fused backend
and the baseline every speed-up is measured against. On CPU (or without triton) it runs the reference's
stage functions one after the other, so the backend works everywhere.

``run_unfused`` writes into a preallocated PreambleOutput and allocates only its scratch buffers from
torch's caching allocator, so it can be captured in a CUDA graph; it never synchronizes with the host.
"""
from __future__ import annotations

import os

import torch

from ..config import QUANT_GROUP, PreambleConfig
from ..output import PreambleOutput
from ..weights import PreambleWeights
from . import reference as ref

_triton_kernels = None


def triton_available(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        _load_triton()
    except ImportError:
        return False
    return True


def _load_triton():
    global _triton_kernels
    if _triton_kernels is None:
        from . import triton_kernels
        _triton_kernels = triton_kernels
    return _triton_kernels


def _p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _triton_shapes_ok(cfg: PreambleConfig) -> bool:
    """The Triton path's tiles divide the DeepSeek-V3 shapes; other configs run the torch stages."""
    pow2 = lambda v: v & (v - 1) == 0  # noqa: E731
    h, e, il = cfg.hidden_size, cfg.n_routed_experts, cfg.shared_local_intermediate
    return (pow2(cfg.n_group) and pow2(cfg.experts_per_group) and e % ROUTER_BN == 0
            and h % (ROUTER_SPLITS * 128) == 0 and h % (GATE_UP_SPLITS * 128) == 0
            and (2 * il) % GATE_UP_BN == 0 and h % DOWN_BN == 0)


def run_unfused(hidden: torch.Tensor, residual: torch.Tensor, weights: PreambleWeights,
                out: PreambleOutput) -> PreambleOutput:
    if triton_available(hidden.device) and _triton_shapes_ok(weights.config):
        return _run_triton(hidden, residual, weights, out)
    return _run_torch(hidden, residual, weights, out)


def _run_torch(hidden, residual, w: PreambleWeights, out: PreambleOutput) -> PreambleOutput:
    # the reference's stage functions, one after the other (CPU, or no triton)
    return out.copy_(ref.reference(hidden, residual, w))


# Tile choices (H200, M <= 8): enough programs to keep ~100+ SMs streaming weights, each reading tens of KB.
ROUTER_BN, ROUTER_SPLITS = 16, 8   # 16 x 8 = 128 programs of 16 rows x 896 K (28 KB)
GATE_UP_BN, GATE_UP_SPLITS = 64, 7  # TP8: 8 x 7 = 56 programs of 64 x 1024 (64 KB); TP1: 448 programs
DOWN_BN = 32                         # 224 programs of 32 x I_l


def _run_triton(hidden, residual, w: PreambleWeights, out: PreambleOutput) -> PreambleOutput:
    tk = _load_triton()
    cfg = w.config
    m, h = hidden.shape
    il = cfg.shared_local_intermediate
    e = cfg.n_routed_experts
    dev = hidden.device
    bm = max(16, _p2(m))
    x = torch.empty(m, h, dtype=torch.bfloat16, device=dev)
    router_part = torch.empty(ROUTER_SPLITS, m, e, dtype=torch.float32, device=dev)
    gate_up_part = torch.empty(GATE_UP_SPLITS, m, 2 * il, dtype=torch.float32, device=dev)
    h_q = torch.empty(m, il, dtype=out.a_q.dtype, device=dev)
    h_s = torch.empty(m, il // QUANT_GROUP, dtype=torch.float32, device=dev)
    nb = _p2(cfg.n_local_experts + 1)
    cursor = torch.empty(nb, dtype=torch.int32, device=dev)

    ng = cfg.hidden_groups
    tk.add_rmsnorm_quant_kernel[(m,)](hidden, residual, w.norm_weight, out.residual, x, out.a_q, out.a_scale,
                                      cfg.rms_norm_eps, H=h, NG=ng, NG_P2=_p2(ng), GROUP=QUANT_GROUP,
                                      num_warps=8)
    tk.skinny_gemm_kernel[(e // ROUTER_BN, ROUTER_SPLITS)](
        x, x, w.gate_weight, w.gate_weight, router_part, m, N=e, K=h, K_PER_SPLIT=h // ROUTER_SPLITS,
        BM=bm, BN=ROUTER_BN, BK=128, BLOCK_SCALED=False, OUT_BF16=False, num_warps=4)
    tk.grouped_topk_kernel[(m,)](router_part, out.router_logits, w.e_score_correction_bias, out.topk_weights,
                                 out.topk_ids, cfg.routed_scaling_factor, m, SPLITS=ROUTER_SPLITS, E=e,
                                 G=cfg.n_group, EPG=cfg.experts_per_group, TOPK_GROUP=cfg.topk_group,
                                 TOPK=cfg.top_k, TOPK_P2=_p2(cfg.top_k), FOLD_SCALING=cfg.fold_routed_scaling,
                                 num_warps=4)
    tk.moe_align_kernel[(1,)](out.topk_ids, out.sorted_token_ids, out.expert_ids, out.num_tokens_post_padded,
                              cursor, cfg.first_local_expert, P=m * cfg.top_k,
                              MAX_PADDED=out.sorted_token_ids.numel(), MAX_BLOCKS=out.expert_ids.numel(),
                              NL=cfg.n_local_experts, NB=nb, BS=cfg.moe_block_size, CHUNK=64, num_warps=4)
    tk.skinny_gemm_kernel[(2 * il // GATE_UP_BN, GATE_UP_SPLITS)](
        out.a_q, out.a_scale, w.w13, w.w13_scale, gate_up_part, m, N=2 * il, K=h,
        K_PER_SPLIT=h // GATE_UP_SPLITS, BM=bm, BN=GATE_UP_BN, BK=128, BLOCK_SCALED=True, OUT_BF16=False,
        num_warps=4)
    tk.silu_mul_quant_kernel[(m, il // QUANT_GROUP)](gate_up_part, h_q, h_s, m, SPLITS=GATE_UP_SPLITS, I=il,
                                                     GROUP=QUANT_GROUP, num_warps=4)
    tk.skinny_gemm_kernel[(h // DOWN_BN, 1)](
        h_q, h_s, w.w2, w.w2_scale, out.shared_out, m, N=h, K=il, K_PER_SPLIT=il, BM=bm, BN=DOWN_BN, BK=128,
        BLOCK_SCALED=True, OUT_BF16=True, num_warps=4)
    return out
