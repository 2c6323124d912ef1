"""The fused backend's host side (placeholder until the megakernel lands: reports that it cannot run)."""
from __future__ import annotations


def can_run(config, m: int, device) -> tuple[bool, str]:
    return False, "the fused megakernel is not built in this version"


def run_fused(hidden, residual, weights, out):
    raise RuntimeError("backend='fused': the fused megakernel is not available in this version; "
                       "use backend='unfused' or 'auto'")
