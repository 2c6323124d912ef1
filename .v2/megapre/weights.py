"""PreambleWeights: the weights one MoE layer's pre-amble reads, in the layout every backend consumes.

Layout (DeepSeek-V3 checkpoint conventions, shared expert already sliced to this TP rank):

    norm_weight              bf16 [H]                 post_attention_layernorm.weight
    gate_weight              bf16 [E, H]              mlp.gate.weight (router)
    e_score_correction_bias  fp32 [E]                 mlp.gate.e_score_correction_bias
    w13                      fp8  [2*I_l, H]          shared_experts gate_proj rows, then up_proj rows
    w13_scale                fp32 [2*I_l/128, H/128]  their weight_scale_inv (dequant = q * scale)
    w2                       fp8  [H, I_l]            shared_experts down_proj columns of this rank
    w2_scale                 fp32 [H/128, I_l/128]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import FP8_E4M3_MAX, WEIGHT_BLOCK, PreambleConfig

FP8 = torch.float8_e4m3fn


def _spec(cfg: PreambleConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    h, e, il = cfg.hidden_size, cfg.n_routed_experts, cfg.shared_local_intermediate
    b = WEIGHT_BLOCK
    return {
        "norm_weight": (torch.bfloat16, (h,)),
        "gate_weight": (torch.bfloat16, (e, h)),
        "e_score_correction_bias": (torch.float32, (e,)),
        "w13": (FP8, (2 * il, h)),
        "w13_scale": (torch.float32, (2 * il // b, h // b)),
        "w2": (FP8, (h, il)),
        "w2_scale": (torch.float32, (h // b, il // b)),
    }


def quantize_fp8_blocks(w: torch.Tensor, block: int = WEIGHT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [N, K] float weight to FP8 e4m3 with one fp32 dequant scale per block x block tile,
    the way DeepSeek-V3 checkpoints are stored (``weight_scale_inv``)."""
    n, k = w.shape
    tiles = w.float().reshape(n // block, block, k // block, block)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True).clamp_min(1e-12)
    scale = amax / FP8_E4M3_MAX
    q = (tiles / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8).reshape(n, k)
    return q, scale.reshape(n // block, k // block).contiguous()


@dataclass
class PreambleWeights:
    config: PreambleConfig
    norm_weight: torch.Tensor
    gate_weight: torch.Tensor
    e_score_correction_bias: torch.Tensor
    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    # Backend-specific repackings (e.g. the fused kernel's pointer table), built once per weight set.
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    TENSOR_FIELDS = ("norm_weight", "gate_weight", "e_score_correction_bias", "w13", "w13_scale", "w2", "w2_scale")

    def __post_init__(self):
        self.validate()

    @property
    def device(self) -> torch.device:
        return self.gate_weight.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.TENSOR_FIELDS}

    def validate(self) -> None:
        """Raise ValueError naming the first tensor whose dtype, shape, device or layout does not match
        the config."""
        if not isinstance(self.config, PreambleConfig):
            raise TypeError(f"PreambleWeights.config: expected PreambleConfig, got {type(self.config).__name__}")
        dev = None
        for name, (dtype, shape) in _spec(self.config).items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"PreambleWeights.{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"PreambleWeights.{name}: expected {dtype} {list(shape)}, "
                                 f"got {t.dtype} {list(t.shape)} (config {self.config.short_name()})")
            if not t.is_contiguous():
                raise ValueError(f"PreambleWeights.{name}: must be contiguous, got strides {t.stride()}")
            if dev is None:
                dev = t.device
            elif t.device != dev:
                raise ValueError(f"PreambleWeights.{name}: on {t.device}, but the other weights are on {dev}")

    def to(self, device) -> "PreambleWeights":
        return PreambleWeights(self.config, **{n: t.to(device) for n, t in self.tensors().items()})

    # ---- constructors --------------------------------------------------------------------------------
    @classmethod
    def random(cls, config: PreambleConfig, seed: int = 0, device="cpu") -> "PreambleWeights":
        """Weights with the magnitudes of a real DeepSeek-V3 layer: RMSNorm gains around 1, router rows
        with std 0.02 (logits of a few units), correction biases of a few hundredths, shared-expert
        weights with std ~0.02 stored as FP8 with 128x128 block scales."""
        g = torch.Generator(device=device).manual_seed(seed)
        cfg = config
        h, e, il = cfg.hidden_size, cfg.n_routed_experts, cfg.shared_local_intermediate

        def randn(*shape, std=1.0):
            return torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std

        norm = (1.0 + randn(h, std=0.25)).abs().to(torch.bfloat16)
        gate = randn(e, h, std=0.02).to(torch.bfloat16)
        bias = randn(e, std=0.03)
        # A few outlier rows/blocks, like real checkpoints, so block scales differ from block to block.
        w13_f = randn(2 * il, h, std=0.02) * (1.0 + 3.0 * torch.rand(2 * il, 1, generator=g, device=device))
        w2_f = randn(h, il, std=0.02) * (1.0 + 3.0 * torch.rand(1, il, generator=g, device=device))
        w13, w13_s = quantize_fp8_blocks(w13_f)
        w2, w2_s = quantize_fp8_blocks(w2_f)
        return cls(cfg, norm, gate, bias, w13, w13_s, w2, w2_s)

    @classmethod
    def from_hf_state_dict(cls, state_dict, layer: int, config: PreambleConfig) -> "PreambleWeights":
        """Take one layer's tensors from a DeepSeek-V3-named state dict (HF checkpoint names) and slice the
        shared expert to ``config.shared_tp_rank``: gate/up rows (column-parallel), down columns
        (row-parallel). The full (unsharded) shapes are checked before slicing."""
        cfg = config
        h, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.shared_intermediate_size
        b = WEIGHT_BLOCK
        p = f"model.layers.{layer}."
        se = p + "mlp.shared_experts."
        expected = {
            p + "post_attention_layernorm.weight": (torch.bfloat16, (h,)),
            p + "mlp.gate.weight": (torch.bfloat16, (e, h)),
            p + "mlp.gate.e_score_correction_bias": (torch.float32, (e,)),
            se + "gate_proj.weight": (FP8, (i, h)),
            se + "gate_proj.weight_scale_inv": (torch.float32, (i // b, h // b)),
            se + "up_proj.weight": (FP8, (i, h)),
            se + "up_proj.weight_scale_inv": (torch.float32, (i // b, h // b)),
            se + "down_proj.weight": (FP8, (h, i)),
            se + "down_proj.weight_scale_inv": (torch.float32, (h // b, i // b)),
        }
        got = {}
        for name, (dtype, shape) in expected.items():
            if name not in state_dict:
                raise ValueError(f"state dict is missing {name!r} (expected {dtype} {list(shape)})")
            t = state_dict[name]
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                actual = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"state dict tensor {name!r}: expected {dtype} {list(shape)}, got {actual}")
            got[name] = t
        il, r = cfg.shared_local_intermediate, cfg.shared_tp_rank
        rows = slice(r * il, (r + 1) * il)
        srows = slice(r * il // b, (r + 1) * il // b)
        w13 = torch.cat([got[se + "gate_proj.weight"][rows], got[se + "up_proj.weight"][rows]])
        w13_s = torch.cat([got[se + "gate_proj.weight_scale_inv"][srows], got[se + "up_proj.weight_scale_inv"][srows]])
        w2 = got[se + "down_proj.weight"][:, rows]
        w2_s = got[se + "down_proj.weight_scale_inv"][:, srows]
        return cls(cfg,
                   got[p + "post_attention_layernorm.weight"].contiguous(),
                   got[p + "mlp.gate.weight"].contiguous(),
                   got[p + "mlp.gate.e_score_correction_bias"].contiguous(),
                   w13.contiguous(), w13_s.contiguous(), w2.contiguous(), w2_s.contiguous())


def weight_spec(config: PreambleConfig):
    """Expected (dtype, shape) of each PreambleWeights tensor for a config."""
    return _spec(config)


__all__ = ["PreambleWeights", "quantize_fp8_blocks", "weight_spec", "FP8"]
