"""PreambleOutput: everything the fused-MoE kernel and the rest of the layer need from one pre-amble call."""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch

from .config import PreambleConfig

FP8 = torch.float8_e4m3fn


@functools.lru_cache(maxsize=256)
def output_spec(config: PreambleConfig, m: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of every output field for M tokens: the single definition of the output layout.
    Cached (run() checks every output against it on every call); callers must not modify the dict."""
    h, e, k = config.hidden_size, config.n_routed_experts, config.top_k
    return {
        "residual": (torch.bfloat16, (m, h)),
        "router_logits": (torch.float32, (m, e)),
        "topk_weights": (torch.float32, (m, k)),
        "topk_ids": (torch.int32, (m, k)),
        "a_q": (FP8, (m, h)),
        "a_scale": (torch.float32, (m, config.hidden_groups)),
        "shared_out": (torch.bfloat16, (m, h)),
        "sorted_token_ids": (torch.int32, (config.max_num_tokens_padded(m),)),
        "expert_ids": (torch.int32, (config.max_num_blocks(m),)),
        "num_tokens_post_padded": (torch.int32, (1,)),
    }


@dataclass
class PreambleOutput:
    """Outputs of ``megapre.run`` for M tokens (vLLM semantics, see README "Semantics").

    residual : bf16 [M, H]          hidden + residual, the next layer's residual
    router_logits : fp32 [M, E]     x @ gate_weight.T, fp32 accumulation
    topk_weights : fp32 [M, top_k]  sigmoid scores of the chosen experts, renormalized
    topk_ids : int32 [M, top_k]     global expert ids, best (biased score) first
    a_q : fp8 e4m3 [M, H]           x quantized per token per 128-group (fused-MoE input)
    a_scale : fp32 [M, H/128]       its dequant scales
    shared_out : bf16 [M, H]        the shared expert's output on this TP rank (a partial sum when TP > 1)
    sorted_token_ids : int32 [P]    moe_align_block_size over local experts; pad value M * top_k
    expert_ids : int32 [P/BLOCK_M]  local expert of each block, -1 for unused blocks
    num_tokens_post_padded : int32 [1]
    """

    residual: torch.Tensor
    router_logits: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    a_q: torch.Tensor
    a_scale: torch.Tensor
    shared_out: torch.Tensor
    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor

    @classmethod
    def empty(cls, config: PreambleConfig, m: int, device="cpu") -> "PreambleOutput":
        return cls(**{n: torch.empty(s, dtype=d, device=device) for n, (d, s) in output_spec(config, m).items()})

    def items(self):
        return [(f.name, getattr(self, f.name)) for f in fields(self)]

    def copy_(self, src: "PreambleOutput") -> "PreambleOutput":
        """Copy every field of ``src`` into this output's buffers (for backends that compute out of place)."""
        for name, t in self.items():
            t.copy_(getattr(src, name))
        return self

    def to(self, device) -> "PreambleOutput":
        return PreambleOutput(**{n: t.to(device) for n, t in self.items()})

    def poison(self) -> "PreambleOutput":
        """Fill every field with a value no correct kernel writes (NaN / out-of-range ids), so an element
        a backend forgot to write shows up in a comparison. Returns self."""
        for _, t in self.items():
            if t.dtype in (torch.int32, torch.int64):
                t.fill_(-7777)
            elif t.dtype == FP8:
                t.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
            else:
                t.fill_(float("nan"))
        return self
