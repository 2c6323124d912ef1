"""The fused backend: one cooperative launch of the persistent megakernel per call.

Per (device, stream, spec) it keeps a workspace (counters that the kernel resets itself, split-K partials,
intermediates) and the task table on the device, both made on the first call, which therefore must not be
inside a CUDA-graph capture (like Triton's JIT). Later calls allocate nothing and never synchronize.
"""
from __future__ import annotations

import os
import threading

import torch

from ..output import PreambleOutput
from ..weights import PreambleWeights
from . import build, launch
from .plan import KernelSpec, check_table, task_table

_lock = threading.Lock()
_entries: dict = {}     # spec -> (cubin, manifest, key)
_tables: dict = {}      # (spec, device) -> int32 tensor
_workspaces: dict = {}  # (spec, device, stream) -> uint8 tensor


_runnable: set = set()  # (config, m, device index) already found runnable: the hot path skips the checks


def can_run(config, m: int, device) -> tuple[bool, str]:
    """Whether backend="fused" can run here, and if not, why (auto logs this)."""
    device = torch.device(device)
    if device.type == "cuda" and (config, m, device.index) in _runnable:
        return True, "ok"
    if device.type != "cuda":
        return False, f"device {device} is not CUDA"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    cap = torch.cuda.get_device_capability(device)
    if cap != (9, 0):
        return False, f"compute capability {cap[0]}.{cap[1]} (the megakernel is built for sm_90a: H100/H200)"
    spec = KernelSpec.from_config(config, m)
    why = spec.unsupported()
    if why:
        return False, why
    if build.load_entry(spec) is None and not build.dsl_available():
        return False, (f"no prebuilt kernel for M={m} in {build.default_cache_dir()} and the CuTe DSL is not "
                       f"installed to build it (run `python -m megapre build` where nvidia-cutlass-dsl is)")
    _runnable.add((config, m, device.index))
    return True, "ok"


def _entry(spec: KernelSpec):
    with _lock:
        if spec not in _entries:
            found = build.load_entry(spec)
            if found is None:
                if not build.dsl_available():
                    raise RuntimeError(
                        f"backend='fused': no prebuilt megakernel for M={spec.m} in {build.default_cache_dir()} "
                        f"(key {build.cache_key(spec)}); run `python -m megapre build` on a machine with "
                        f"nvidia-cutlass-dsl and copy that folder here, or set MEGAPRE_CACHE")
                build.compile_spec(spec)
                found = build.load_entry(spec)
            cubin, manifest = found
            _entries[spec] = (cubin, manifest, build.cache_key(spec))
        return _entries[spec]


def _prepare(spec: KernelSpec, device: torch.device, stream) -> tuple:
    """Workspace per (spec, device, stream) and task table per (spec, device). The table needs a host-to-device
    copy, so it must exist before any capture; a workspace first needed inside a capture is allocated there
    (its zero-fill becomes a memset node of the graph, which keeps every replay correct)."""
    key = (spec, device.index, stream.cuda_stream)
    ws = _workspaces.get(key)
    table = _tables.get((spec, device.index))
    if ws is not None and table is not None:
        return ws, table
    capturing = torch.cuda.is_current_stream_capturing()
    if table is None and capturing:
        raise RuntimeError("backend='fused': call megapre.run once for this M on this device before capturing a "
                           "CUDA graph (the first call uploads the megakernel's task table)")
    with _lock:
        if table is None:
            rows = task_table(spec)
            check_table(rows)
            table = torch.tensor(rows, dtype=torch.int32, device=device).contiguous()
            _tables[(spec, device.index)] = table
        if ws is None:
            with torch.cuda.stream(stream):
                ws = torch.zeros(spec.ws_layout()["total"], dtype=torch.uint8, device=device)
            _workspaces[key] = ws
    return ws, table


def run_fused(hidden: torch.Tensor, residual: torch.Tensor, weights: PreambleWeights,
              out: PreambleOutput, trace: bool = False) -> PreambleOutput:
    """One launch. trace=True runs the timeline-recording build of the kernel (see read_trace)."""
    cfg = weights.config
    m = hidden.shape[0]
    spec = KernelSpec.from_config(cfg, m, trace=trace)
    why = spec.unsupported()
    if why:
        raise ValueError(f"backend='fused' cannot run this shape: {why}")
    device = hidden.device
    cubin, manifest, key = _entry(spec)
    kernel = launch.get_kernel(cubin, manifest, key, device)
    stream = torch.cuda.current_stream(device)
    ws, table = _prepare(spec, device, stream)
    w = weights
    args = (hidden.data_ptr(), residual.data_ptr(), w.norm_weight.data_ptr(), w.gate_weight.data_ptr(),
            w.e_score_correction_bias.data_ptr(), w.w13.data_ptr(), w.w13_scale.data_ptr(), w.w2.data_ptr(),
            w.w2_scale.data_ptr(), out.residual.data_ptr(), out.router_logits.data_ptr(),
            out.topk_weights.data_ptr(), out.topk_ids.data_ptr(), out.a_q.data_ptr(), out.a_scale.data_ptr(),
            out.shared_out.data_ptr(), out.sorted_token_ids.data_ptr(), out.expert_ids.data_ptr(),
            out.num_tokens_post_padded.data_ptr(), ws.data_ptr(), table.data_ptr(), table.shape[0],
            cfg.first_local_expert, -2 if os.environ.get("MEGAPRE_NO_PREFETCH") == "1" else -1)
    kernel.launch(args, grid=kernel.num_sms, stream=stream)
    return out


def run_stages(hidden, residual, weights: PreambleWeights, out: PreambleOutput) -> PreambleOutput:
    """The same device stage functions, each as its own small kernel (grid = its tiles), in queue order.
    For tests: a difference between this and run_fused points at the queue/sync layer, not the math."""
    from .plan import STAGE_NAMES
    cfg = weights.config
    m = hidden.shape[0]
    spec = KernelSpec.from_config(cfg, m)
    device = hidden.device
    cubin, manifest, key = _entry(spec)
    kernel = launch.get_kernel(cubin, manifest, key, device)
    stream = torch.cuda.current_stream(device)
    ws, table = _prepare(spec, device, stream)
    w = weights
    base = [hidden.data_ptr(), residual.data_ptr(), w.norm_weight.data_ptr(), w.gate_weight.data_ptr(),
            w.e_score_correction_bias.data_ptr(), w.w13.data_ptr(), w.w13_scale.data_ptr(), w.w2.data_ptr(),
            w.w2_scale.data_ptr(), out.residual.data_ptr(), out.router_logits.data_ptr(),
            out.topk_weights.data_ptr(), out.topk_ids.data_ptr(), out.a_q.data_ptr(), out.a_scale.data_ptr(),
            out.shared_out.data_ptr(), out.sorted_token_ids.data_ptr(), out.expert_ids.data_ptr(),
            out.num_tokens_post_padded.data_ptr(), ws.data_ptr(), table.data_ptr(), table.shape[0],
            cfg.first_local_expert]
    tiles = spec.stage_tiles()
    for stage in range(len(STAGE_NAMES)):
        kernel.launch(tuple(base + [stage]), grid=tiles[stage], stream=stream, cooperative=False)
    return out


def read_trace(config, m: int, device=None) -> list[dict]:
    """The last traced launch's timeline (synchronizes): one dict per task, times in ns from the first ticket."""
    from .plan import STAGE_NAMES, TRACE_INTS
    device = torch.device(device or "cuda")
    spec = KernelSpec.from_config(config, m, trace=True)
    torch.cuda.synchronize(device)
    rows = task_table(spec)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ws = next(v for k, v in _workspaces.items() if k[0] == spec and k[1] == idx)
    lay = spec.ws_layout()
    rec = ws[lay["trace"]: lay["trace"] + len(rows) * TRACE_INTS * 8].view(torch.int64).view(-1, TRACE_INTS).cpu()
    t0 = int(rec[:, 1].min())
    return [dict(task=i, stage=STAGE_NAMES[r[0]], tile=r[1], cta=int(rec[i, 0]), ticket=int(rec[i, 1]) - t0,
                 ready=int(rec[i, 2]) - t0, done=int(rec[i, 3]) - t0) for i, r in enumerate(rows)]
