"""The fused backend: one launch of the persistent megakernel per call.

Launch: by default with programmatic dependent launch (PDL), so the kernel's CTAs are scheduled while the
previous kernel in the stream drains and prefetch the weights into L2 before griddepcontrol.wait; the task
queue does not need co-resident CTAs (a task only waits on tasks with lower tickets, all taken by running
CTAs). MEGAPRE_PDL=0 launches cooperatively instead (no overlap with the previous kernel).
MEGAPRE_PREFETCH_CTAS=n: how many CTAs share the L2 weight prefetch (default: 64 for TP8, none for TP1; _prefetch_ctas).

Per (device, stream, spec) it keeps a workspace (ever-growing ticket and counters, split-K partials,
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
from .plan import (ERR_INTS, PHASE_SLOTS, STAGE_NAMES, TRACE_INTS, TRACE_POINTS, TRACE_RETRIES, WHATIF_BENCH_ENV, WHATIF_ENV, WS_ERROR,
                   WS_ERRPTR, KernelSpec, check_table, pack_table, task_table)


class MegapreKernelError(RuntimeError):
    """The fused kernel gave up waiting for a dependency (it never hangs; that call's outputs are wrong)."""

_lock = threading.Lock()
_entries: dict = {}     # spec -> (cubin, manifest, key)
_tables: dict = {}      # (spec, device) -> int32 tensor
_workspaces: dict = {}  # (spec, device, stream) -> uint8 tensor
_err_records: dict = {}  # device index -> (host-mapped int32 record, its device address)
_launched_tables: set = set()  # device addresses of task tables launched at least once


def _error_record(device: torch.device):
    """Per device: a pinned, device-mapped int32 record the kernel writes when a wait gives up, so the host
    can check it before every launch without synchronizing."""
    idx = device.index
    if idx not in _err_records:
        import ctypes
        drv = launch._driver()
        with torch.cuda.device(device):
            host = launch.check(drv.cuMemHostAlloc(ERR_INTS * 4, drv.CU_MEMHOSTALLOC_DEVICEMAP
                                                   | drv.CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc")
            dev = launch.check(drv.cuMemHostGetDevicePointer(host, 0), "cuMemHostGetDevicePointer")
        arr = (ctypes.c_int32 * ERR_INTS).from_address(int(host))
        for i in range(ERR_INTS):
            arr[i] = 0
        _err_records[idx] = (arr, int(dev))
    return _err_records[idx]


def _raise_pending(device: torch.device) -> None:
    rec = _err_records.get(device.index)
    if rec is None or rec[0][0] == 0:
        return
    arr = rec[0]
    task, stage, tile, ctr, seen, target = (arr[i] for i in range(6))
    for i in range(ERR_INTS):
        arr[i] = 0
    for ws in [w for k, w in _workspaces.items() if k[1] == device.index]:
        ws[WS_ERROR * 4: WS_ERROR * 4 + 4].zero_()  # re-arm the first-failure flag
    name = STAGE_NAMES[stage] if 0 <= stage < len(STAGE_NAMES) else f"stage {stage}"
    on = STAGE_NAMES[ctr] if 0 <= ctr < len(STAGE_NAMES) else f"counter {ctr}"
    raise MegapreKernelError(
        f"fused megakernel: task {task - 1} ({name}, tile {tile}) gave up waiting for '{on}' "
        f"({seen} of {target} signals) on {torch.cuda.get_device_name(device)}; the outputs of that call are "
        f"wrong. This means a broken task table or a CTA that could not run; please report it.")


def check_errors(device=None, synchronize: bool = True) -> None:
    """Raise MegapreKernelError if a fused launch on ``device`` gave up on a dependency since the last check.
    ``megapre.run`` does this (without synchronizing) before every fused launch."""
    device = torch.device(device or "cuda")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if synchronize:
        torch.cuda.synchronize(device)
    _raise_pending(device)


_runnable: set = set()  # (config, m, device index, staged) already found runnable: the hot path skips the checks


def can_run(config, m: int, device, staged: bool = False) -> tuple[bool, str]:
    """Whether backend="fused" (staged: run_stages) can run here, and if not, why (auto logs this)."""
    device = torch.device(device)
    if device.type == "cuda" and (config, m, device.index, staged) in _runnable:
        return True, "ok"
    if device.type != "cuda":
        return False, f"device {device} is not CUDA"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    cap = torch.cuda.get_device_capability(device)
    if cap != (9, 0):
        return False, f"compute capability {cap[0]}.{cap[1]} (the megakernel is built for sm_90a: H100/H200)"
    spec = KernelSpec.from_config(config, m, staged=staged)
    why = spec.unsupported()
    if why:
        return False, why
    if build.load_entry(spec) is None and not build.dsl_available():
        return False, (f"no prebuilt kernel for M={m} in {build.default_cache_dir()} and the CuTe DSL is not "
                       f"installed to build it (run `python -m megapre build` where nvidia-cutlass-dsl is)")
    _runnable.add((config, m, device.index, staged))
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


def fill_sentinels(spec: KernelSpec, ws: torch.Tensor) -> None:
    """Both parity blocks of every flagged area (the norm's outputs, the router and gate_up partials:
    KernelSpec.sentinel_spans) as plan.NORM_SENTINEL (0xff bytes) and both blocks of the gate_up fixed-point sums as
    zeros: what a launch of any parity expects to find (KernelSpec.norm_flags). A new
    workspace needs it, and so does one whose launch number was moved by hand (tests/test_gpu_reliability.py)."""
    for off, nbytes in spec.sentinel_spans():
        ws[off: off + nbytes].fill_(0xFF)
    gx = spec.ws_layout()["gu_fixed"]
    ws[gx: gx + 2 * spec.gu_fixed_bytes].zero_()


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
            table = torch.tensor(pack_table(rows), dtype=torch.int32, device=device)
            _tables[(spec, device.index)] = table
        if ws is None:
            _, err_dev = _error_record(device)
            with torch.cuda.stream(stream):
                ws = torch.zeros(spec.ws_layout()["total"], dtype=torch.uint8, device=device)
                fill_sentinels(spec, ws)
                ws[WS_ERRPTR * 4: WS_ERRPTR * 4 + 8].view(torch.int64).fill_(err_dev)
            _workspaces[key] = ws
    return ws, table


def _prefetch_ctas(spec: KernelSpec, num_sms: int) -> int:
    """How many CTAs split the L2 weight prefetch (after the norm CTAs). Measured with scripts/sweep_fused.py on
    the H200: TP8 is 0.2-0.3 us faster with every CTA taking a slice (earlier sessions), ~0.2 us slower with none
    (b70c2ad). TP1 (47 MB of weights, about what L2 holds) was ~1.3 us faster with 64 while CTAs took every task
    from the queue; since CTAs start on static tasks whose weight loads go out under PDL (b70c2ad), TP1 M = 1 is
    fastest with no prefetch at all: 25.9 us against 26.5 (64 CTAs) and 28.1 (all). Since the router's weights
    are no longer prefetched (session 13), TP8 is fastest with 64: EP8 M = 1 / 2 -0.08..-0.1 us against every CTA,
    M = 4 / 8 even; 40 lost 0.2-0.3 at M = 4 / 8 (H200, one call, two rounds); session 29 (four rounds): 32 even with
    64, none +0.14..+0.63 us. The CTAs that start late -- on the SMs the previous call's last tasks hold, ~57 of 132
    at M = 1 -- then prefetch nothing they would need sooner than they could load it themselves."""
    v = os.environ.get("MEGAPRE_PREFETCH_CTAS")
    if os.environ.get("MEGAPRE_NO_PREFETCH") == "1":
        return 0
    if v is not None:
        return max(0, min(int(v), num_sms))
    return min(64, num_sms) if spec.small_shared else 0


def _prefetch_delay_ns() -> int:
    """MEGAPRE_PREFETCH_DELAY_NS: how long the CTAs that do not start on a norm task hold back their weight
    loads and prefetch, so that the norm's inputs (the norm weight comes from HBM and is on the critical path)
    get ahead of the weight stream. 600 ns was the TP8 default while the delay also held up those CTAs' first
    ticket (-0.2..-0.4 us then, three sweeps); with static first tasks (b70c2ad) the sweep has no delay fastest
    (EP8 M = 1 / 2 / 8: 7.51 / 7.82 / 10.16 us against 7.79 / 8.02 / 10.28 at 600 ns), so the default is 0."""
    v = os.environ.get("MEGAPRE_PREFETCH_DELAY_NS")
    if v is not None:
        return max(0, int(v))
    return 0


def _kernel_args(manifest: dict, hidden, residual, w: PreambleWeights, out: PreambleOutput, ws, table, mode: int,
                 prefetch_ctas: int, prefetch_delay: int = 0) -> tuple:
    """The kernel's arguments in the order its manifest lists them (megakernel.PARAMS at build time)."""
    if (mode >= 0) != bool(manifest.get("spec", {}).get("staged", False)):  # each cubin compiles only its own path
        raise RuntimeError(f"mode {mode} launched on a {'staged' if mode < 0 else 'fused'} megakernel cubin "
                           f"(KernelSpec.staged: run_stages uses the staged build, run_fused the fused one)")
    tensors = {"hidden": hidden, "residual": residual, "norm_w": w.norm_weight, "gate_w": w.gate_weight,
               "bias": w.e_score_correction_bias, "w13": w.w13, "w13_s": w.w13_scale, "w2": w.w2,
               "w2_s": w.w2_scale}
    for name, t in tensors.items():  # 16-byte vector loads and L2 bulk prefetches
        if t.data_ptr() % 16:
            raise ValueError(f"backend='fused': {name} must start at a 16-byte aligned address "
                             f"(got {t.data_ptr():#x}; a view at an odd offset? pass a .clone())")
    tensors.update(o_res=out.residual, o_logits=out.router_logits, o_w=out.topk_weights, o_ids=out.topk_ids,
                   o_aq=out.a_q, o_as=out.a_scale, o_shared=out.shared_out, o_sorted=out.sorted_token_ids,
                   o_eids=out.expert_ids, o_ntpp=out.num_tokens_post_padded, ws=ws, tasks=table)
    values = {k: t.data_ptr() for k, t in tensors.items()}
    values.update(n_tasks=table.numel(), first_local=w.config.first_local_expert, mode=mode,
                  prefetch_ctas=prefetch_ctas, prefetch_delay=prefetch_delay)
    try:
        return tuple(values[p] for p in manifest["params"])
    except KeyError as e:
        raise RuntimeError(f"the cached megakernel takes a parameter this megapre does not know ({e}); rebuild "
                           f"the cache with `python -m megapre build`") from None


def run_fused(hidden: torch.Tensor, residual: torch.Tensor, weights: PreambleWeights,
              out: PreambleOutput, trace: bool = False, _table: torch.Tensor | None = None) -> PreambleOutput:
    """One launch. trace=True runs the timeline-recording build of the kernel (see read_trace).
    _table replaces the packed task table (tests plant a never-signalled wait with it)."""
    cfg = weights.config
    m = hidden.shape[0]
    spec = KernelSpec.from_config(cfg, m, trace=trace)
    why = spec.unsupported()
    if why:
        raise ValueError(f"backend='fused' cannot run this shape: {why}")
    if spec.whatif and os.environ.get(WHATIF_BENCH_ENV) != "1":
        raise ValueError(f"{WHATIF_ENV}={','.join(spec.whatif)} is set: that build leaves work out and computes wrong "
                         f"outputs; only the bench's what-if backends run it (unset {WHATIF_ENV})")
    device = hidden.device
    cubin, manifest, key = _entry(spec)
    kernel = launch.get_kernel(cubin, manifest, key, device)
    stream = torch.cuda.current_stream(device)
    ws, table = _prepare(spec, device, stream)
    _raise_pending(device)
    if _table is not None:
        if _table.numel() != spec.n_tasks:
            raise ValueError(f"_table has {_table.numel()} tasks, the kernel was built for {spec.n_tasks}")
        table = _table
    args = _kernel_args(manifest, hidden, residual, weights, out, ws, table, -1, _prefetch_ctas(spec, kernel.num_sms),
                        _prefetch_delay_ns())
    # The kernel reads the task table before griddepcontrol.wait: a table's first launch goes without PDL, so
    # the copy that uploaded it is surely complete (later launches find it long done).
    # (A planted _table is always launched without PDL.)
    pdl = os.environ.get("MEGAPRE_PDL", "1") != "0" and _table is None and table.data_ptr() in _launched_tables
    kernel.launch(args, grid=spec.launch_grid(kernel.num_sms), stream=stream, pdl=pdl, cooperative=not pdl)
    if _table is None:
        _launched_tables.add(table.data_ptr())
    return out


def run_stages(hidden, residual, weights: PreambleWeights, out: PreambleOutput) -> PreambleOutput:
    """The same device stage functions, each as its own small kernel (grid = its tiles), in queue order, from
    the staged build of the megakernel (KernelSpec.staged). For tests: a difference between this and run_fused
    points at the queue/sync layer, not the math."""
    from .plan import STAGE_NAMES
    cfg = weights.config
    m = hidden.shape[0]
    spec = KernelSpec.from_config(cfg, m, staged=True)
    device = hidden.device
    cubin, manifest, key = _entry(spec)
    kernel = launch.get_kernel(cubin, manifest, key, device)
    stream = torch.cuda.current_stream(device)
    ws, table = _prepare(spec, device, stream)
    if out.residual.data_ptr() == residual.data_ptr():
        # In-place residual update: run alone, the norm stage's tasks write their chunk of the residual output while
        # the same token's other norm tasks may still read the whole row (in the megakernel the gate_up tasks or a
        # per-token last reader write it instead). This debug path reads a copy.
        residual = residual.clone()
    tiles = spec.stage_tiles()
    for stage in range(len(STAGE_NAMES)):
        if tiles[stage] == 0:  # e.g. act, when the down tasks do it (spec.fuse_act)
            continue
        kernel.launch(_kernel_args(manifest, hidden, residual, weights, out, ws, table, stage, 0), grid=tiles[stage],
                      stream=stream)
    return out


def workspace_of(spec: KernelSpec, device=None, stream=None) -> torch.Tensor:
    """The workspace launches of this spec used on the device (default: the current one): the given stream's, or
    else the one made last. For scripts and tests that read what the kernel left there."""
    device = torch.device(device or "cuda")
    idx = device.index if device.index is not None else torch.cuda.current_device()
    found = [ws for (sp, dev, st), ws in _workspaces.items()
             if sp == spec and dev == idx and (stream is None or st == stream.cuda_stream)]
    if not found:
        raise LookupError(f"no workspace of this spec on cuda:{idx}{'' if stream is None else ' on that stream'}: "
                          f"nothing launched it there yet (M = {spec.m}, what-if {spec.whatif}, trace {spec.trace})")
    return found[-1]


def _traced_workspace(config, m: int, device) -> tuple:
    """(spec, workspace, task records [n, TRACE_INTS] on the CPU, first ticket time) of the last traced launch
    (synchronizes)."""
    device = torch.device(device or "cuda")
    spec = KernelSpec.from_config(config, m, trace=True)
    torch.cuda.synchronize(device)
    ws = workspace_of(spec, device)
    lay = spec.ws_layout()
    rec = ws[lay["trace"]: lay["trace"] + spec.n_tasks * TRACE_INTS * 8].view(torch.int64).view(-1, TRACE_INTS).cpu()
    return spec, ws, rec, int(rec[:, 1].min())


def read_trace(config, m: int, device=None) -> list[dict]:
    """The last traced launch's timeline (synchronizes): one dict per task, times in ns from the first ticket
    (points: the task's first stamped points, plan.TRACE_POINTS; -1 where not passed; retries: its failed polls of
    flagged data)."""
    spec, _, rec, t0 = _traced_workspace(config, m, device)
    return [dict(task=i, stage=STAGE_NAMES[r[0]], tile=r[1], cta=int(rec[i, 0]), ticket=int(rec[i, 1]) - t0,
                 ready=int(rec[i, 2]) - t0, done=int(rec[i, 3]) - t0,
                 points=[int(rec[i, 4 + j]) - t0 if int(rec[i, 4 + j]) else -1 for j in range(TRACE_POINTS)],
                 retries=int(rec[i, TRACE_RETRIES]))
            for i, r in enumerate(task_table(spec))]


def read_phases(config, m: int, device=None) -> dict[str, list[float]]:
    """The last traced launch's in-task points (the stamp calls in megakernel.py) of tile 0 of each stage,
    in us from the first ticket; -1 where a point was not passed (or not stamped for that stage)."""
    spec, ws, _, t0 = _traced_workspace(config, m, device)
    lay = spec.ws_layout()
    area = ws[lay["phases"]: lay["phases"] + len(STAGE_NAMES) * PHASE_SLOTS * 8]
    ph = area.view(torch.int64).cpu()
    area.zero_()
    return {name: [(int(ph[s * PHASE_SLOTS + j]) - t0) / 1000 if int(ph[s * PHASE_SLOTS + j]) else -1.0
                   for j in range(PHASE_SLOTS)] for s, name in enumerate(STAGE_NAMES)}
