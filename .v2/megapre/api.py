"""megapre.run: the public entry point, argument checks and backend choice."""
from __future__ import annotations

import logging
import os

import torch

from .output import PreambleOutput, output_spec
from .weights import PreambleWeights

log = logging.getLogger("megapre")

BACKENDS = ("auto", "fused", "unfused", "reference")
ENV_BACKEND = "MEGAPRE_BACKEND"
FUSED_MAX_TOKENS = 8      # the megakernel's tiles hold at most 8 tokens (decode)
MAX_TOKENS = 4096         # unfused / reference: bounded so the sort scratch and GEMM tiles stay small


def _check_tensor(name: str, t, dtype: torch.dtype, shape: tuple, device: torch.device | None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} (where the weights are), got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous, got strides {t.stride()} for shape {list(t.shape)}")


def check_inputs(hidden, residual, weights, out, max_tokens: int) -> int:
    """Validate every argument before anything runs or is written. Returns M."""
    if not isinstance(weights, PreambleWeights):
        raise TypeError(f"weights: expected megapre.PreambleWeights, got {type(weights).__name__}")
    cfg = weights.config
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden: expected a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden: expected a 2-D [M, {cfg.hidden_size}] tensor, got shape {list(hidden.shape)}")
    m = hidden.shape[0]
    if not 1 <= m <= max_tokens:
        raise ValueError(f"hidden: M = {m} tokens, supported range is 1..{max_tokens}")
    dev = weights.device
    _check_tensor("hidden", hidden, torch.bfloat16, (m, cfg.hidden_size), dev)
    _check_tensor("residual", residual, torch.bfloat16, (m, cfg.hidden_size), dev)
    if out is not None:
        if not isinstance(out, PreambleOutput):
            raise TypeError(f"out: expected megapre.PreambleOutput, got {type(out).__name__}")
        # every tensor below is contiguous and on `dev` (checked first), so a byte span describes it
        inputs = (("hidden", _span(hidden)), ("residual", _span(residual)))
        fields = []
        for name, (dtype, shape) in output_spec(cfg, m).items():
            t = getattr(out, name)
            _check_tensor(f"out.{name}", t, dtype, shape, dev)
            span = _span(t)
            # out.residual may alias residual (in-place residual update); nothing else may alias an input
            for iname, ispan in inputs:
                if name == "residual" and iname == "residual" and span[0] == ispan[0]:
                    continue  # exactly the same buffer (same shape, both contiguous): in-place update
                if _spans_overlap(span, ispan):
                    raise ValueError(f"out.{name} overlaps the input {iname}")
            fields.append((name, span))
        for i, (na, a) in enumerate(fields):
            for nb, b in fields[i + 1:]:
                if _spans_overlap(a, b):
                    raise ValueError(f"out.{na} and out.{nb} share memory; every output needs its own buffer")
    return m


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _spans_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < a[1] and b[0] < b[1] and a[0] < b[1] and b[0] < a[1]


def choose_backend(backend: str, device: torch.device, m: int, config) -> str:
    """Resolve "auto" (or MEGAPRE_BACKEND) to a concrete backend, logging why at debug level."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"{ENV_BACKEND}: expected one of {BACKENDS}, got {env!r}")
            backend = env
    if backend != "auto":
        return backend
    from .host import fused
    ok, why = fused.can_run(config, m, device)
    if ok:
        log.debug("megapre: auto -> fused (M=%d, %s)", m, device)
        return "fused"
    log.debug("megapre: auto -> unfused: %s", why)
    return "unfused"


def run(hidden: torch.Tensor, residual: torch.Tensor, weights: PreambleWeights, *, backend: str = "auto",
        out: PreambleOutput | None = None) -> PreambleOutput:
    """Run the DeepSeek-V3 MoE pre-amble for M tokens.

    Parameters
    ----------
    hidden : bf16 [M, H], the attention output (after its all-reduce).
    residual : bf16 [M, H], the residual stream. Not modified unless ``out.residual`` is this tensor.
    weights : PreambleWeights of the layer (its ``config`` fixes every shape).
    backend : "auto" (default; fused where it can run, else unfused; ``MEGAPRE_BACKEND`` overrides),
        "fused" (one persistent kernel), "unfused" (separate kernels) or "reference" (plain torch).
    out : preallocated PreambleOutput (``PreambleOutput.empty(config, M, device)``) for CUDA-graph capture.

    Returns
    -------
    PreambleOutput (``out`` if given). No host-device synchronization on the GPU paths.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    limit = FUSED_MAX_TOKENS if backend == "fused" else MAX_TOKENS
    m = check_inputs(hidden, residual, weights, out, limit)
    chosen = choose_backend(backend, weights.device, m, weights.config)
    if chosen == "fused":
        if m > FUSED_MAX_TOKENS:
            raise ValueError(f"hidden: M = {m} tokens, the fused backend supports 1..{FUSED_MAX_TOKENS}")
        from .host import fused
        ok, why = fused.can_run(weights.config, m, weights.device)
        if not ok:
            raise ValueError(f"backend='fused' cannot run here: {why}")
    if out is None:
        out = PreambleOutput.empty(weights.config, m, weights.device)
    if chosen == "reference":
        from .host.reference import reference
        return out.copy_(reference(hidden, residual, weights))
    if chosen == "unfused":
        from .host.unfused import run_unfused
        return run_unfused(hidden, residual, weights, out)
    from .host import fused
    return fused.run_fused(hidden, residual, weights, out)
