"""PreambleConfig: the one source of truth for the dimensions and parallel layout of the MoE pre-amble.

Everything else (weight shapes, output sizes, the reference, the unfused kernels and the megakernel's task
table) derives its numbers from here, so a shape rule lives in exactly one place.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

FP8_E4M3_MAX = 448.0
QUANT_GROUP = 128  # activation quantization group along K (per token), and the weight block edge
WEIGHT_BLOCK = 128  # FP8 weight scales are per 128 x 128 block (DeepSeek-V3 checkpoints)


def _fail(field: str, value, rule: str):
    raise ValueError(f"PreambleConfig.{field}={value!r}: {rule}")


@dataclass(frozen=True)
class PreambleConfig:
    """Dimensions and parallel layout of one MoE layer's pre-amble.

    Parameters
    ----------
    hidden_size : model width H (7168 for DeepSeek-V3).
    n_routed_experts : routed experts E (256).
    n_group, topk_group : experts are split into ``n_group`` groups; the best ``topk_group`` survive.
    top_k : experts per token (8).
    shared_intermediate_size : the shared expert's full intermediate size I (2048), before TP sharding.
    rms_norm_eps : RMSNorm epsilon.
    routed_scaling_factor : 2.5 for DeepSeek-V3. vLLM applies it after the MoE, so it only touches
        ``topk_weights`` here when ``fold_routed_scaling`` is True.
    ep_size, ep_rank : expert parallelism. Rank r owns experts [r * E/ep, (r+1) * E/ep); token sorting
        covers only those.
    shared_tp_size, shared_tp_rank : tensor parallelism of the shared expert (I / tp columns per rank).
    moe_block_size : BLOCK_M of moe_align_block_size (the fused-MoE kernel's token tile).
    """

    hidden_size: int = 7168
    n_routed_experts: int = 256
    n_group: int = 8
    topk_group: int = 4
    top_k: int = 8
    shared_intermediate_size: int = 2048
    rms_norm_eps: float = 1e-6
    routed_scaling_factor: float = 2.5
    fold_routed_scaling: bool = False
    ep_size: int = 1
    ep_rank: int = 0
    shared_tp_size: int = 1
    shared_tp_rank: int = 0
    moe_block_size: int = 16

    def __post_init__(self):
        for name in ("hidden_size", "n_routed_experts", "n_group", "topk_group", "top_k",
                     "shared_intermediate_size", "ep_size", "shared_tp_size", "moe_block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                _fail(name, v, "must be a positive int")
        if self.hidden_size % QUANT_GROUP:
            _fail("hidden_size", self.hidden_size, f"must be a multiple of {QUANT_GROUP} (FP8 group size)")
        if self.n_routed_experts % self.n_group:
            _fail("n_group", self.n_group, f"must divide n_routed_experts={self.n_routed_experts}")
        if self.experts_per_group < 2:
            _fail("n_group", self.n_group, "each group needs at least 2 experts (group score = sum of top-2)")
        if self.topk_group > self.n_group:
            _fail("topk_group", self.topk_group, f"must be <= n_group={self.n_group}")
        if self.top_k > self.topk_group * self.experts_per_group:
            _fail("top_k", self.top_k,
                  f"must be <= topk_group * experts_per_group = {self.topk_group * self.experts_per_group}")
        if self.n_routed_experts % self.ep_size:
            _fail("ep_size", self.ep_size, f"must divide n_routed_experts={self.n_routed_experts}")
        for name in ("ep_rank", "shared_tp_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                _fail(name, v, "must be an int")
        for name in ("rms_norm_eps", "routed_scaling_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                _fail(name, v, "must be a number")
        if not (isinstance(self.ep_rank, int) and 0 <= self.ep_rank < self.ep_size):
            _fail("ep_rank", self.ep_rank, f"must be in [0, ep_size={self.ep_size})")
        if self.shared_intermediate_size % (self.shared_tp_size * WEIGHT_BLOCK):
            _fail("shared_tp_size", self.shared_tp_size,
                  f"shared_intermediate_size={self.shared_intermediate_size} must split into "
                  f"shared_tp_size shards that are multiples of {WEIGHT_BLOCK}")
        if not (isinstance(self.shared_tp_rank, int) and 0 <= self.shared_tp_rank < self.shared_tp_size):
            _fail("shared_tp_rank", self.shared_tp_rank, f"must be in [0, shared_tp_size={self.shared_tp_size})")
        if self.moe_block_size & (self.moe_block_size - 1):
            _fail("moe_block_size", self.moe_block_size, "must be a power of two")
        if not (self.rms_norm_eps > 0.0):
            _fail("rms_norm_eps", self.rms_norm_eps, "must be > 0")
        if not (self.routed_scaling_factor > 0.0):
            _fail("routed_scaling_factor", self.routed_scaling_factor, "must be > 0")

    # ---- presets -------------------------------------------------------------------------------------
    @classmethod
    def deepseek_v3(cls, *, ep_size: int = 1, ep_rank: int = 0, shared_tp_size: int = 1,
                    shared_tp_rank: int = 0, **overrides) -> "PreambleConfig":
        """DeepSeek-V3 / V3.1 / R1 dimensions (they share the MoE layer shape)."""
        return cls(ep_size=ep_size, ep_rank=ep_rank, shared_tp_size=shared_tp_size,
                   shared_tp_rank=shared_tp_rank, **overrides)

    @classmethod
    def deepseek_v3_ep8(cls, ep_rank: int = 0, **overrides) -> "PreambleConfig":
        """The seed's deployment: EP8 routed experts, shared expert TP8 (I = 256 per rank)."""
        return cls.deepseek_v3(ep_size=8, ep_rank=ep_rank, shared_tp_size=8, shared_tp_rank=ep_rank, **overrides)

    def replace(self, **changes) -> "PreambleConfig":
        return dataclasses.replace(self, **changes)

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def n_local_experts(self) -> int:
        return self.n_routed_experts // self.ep_size

    @property
    def first_local_expert(self) -> int:
        return self.ep_rank * self.n_local_experts

    @property
    def shared_local_intermediate(self) -> int:
        """Shared-expert intermediate columns on this TP rank (256 at TP8)."""
        return self.shared_intermediate_size // self.shared_tp_size

    @property
    def hidden_groups(self) -> int:
        return self.hidden_size // QUANT_GROUP

    def max_num_tokens_padded(self, m: int) -> int:
        """Length of sorted_token_ids: the worst case of padding every local expert that has a pair to a
        multiple of BLOCK_M. vLLM's bound (pairs + experts * (BLOCK_M - 1), capped at pairs * BLOCK_M when
        there are fewer pairs than experts), taken over the experts local to this EP rank."""
        pairs = m * self.top_k
        return min(pairs * self.moe_block_size, pairs + self.n_local_experts * (self.moe_block_size - 1))

    def max_num_blocks(self, m: int) -> int:
        """Length of expert_ids."""
        return -(-self.max_num_tokens_padded(m) // self.moe_block_size)

    def weight_bytes(self) -> int:
        """Bytes of weights one call must read (the memory floor's numerator)."""
        h, e, i = self.hidden_size, self.n_routed_experts, self.shared_local_intermediate
        router = e * h * 2 + e * 4 + h * 2
        w13 = 2 * i * h + (2 * i // WEIGHT_BLOCK) * (h // WEIGHT_BLOCK) * 4
        w2 = h * i + (h // WEIGHT_BLOCK) * (i // WEIGHT_BLOCK) * 4
        return router + w13 + w2

    def short_name(self) -> str:
        return (f"H{self.hidden_size}-E{self.n_routed_experts}-g{self.n_group}k{self.topk_group}-top{self.top_k}"
                f"-I{self.shared_intermediate_size}tp{self.shared_tp_size}r{self.shared_tp_rank}"
                f"-ep{self.ep_size}r{self.ep_rank}-bs{self.moe_block_size}"
                f"{'-fold' if self.fold_routed_scaling else ''}")


# The two deployments the project measures and prebuilds kernels for (bench, build, profile).
SHAPE_PRESETS = {
    # The seed's deployment: routed experts EP8 (rank 0), shared expert TP8 (I = 256 per rank).
    "ep8": lambda: PreambleConfig.deepseek_v3_ep8(ep_rank=0),
    # One GPU holds the whole layer: all 256 experts local, shared expert TP1 (I = 2048).
    "tp1": lambda: PreambleConfig.deepseek_v3(),
}
