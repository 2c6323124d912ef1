"""Timing as the project defines it, and the benchmark behind ``python -m megapre bench``.

Per-call time: one CUDA graph holds 16 consecutive calls cycling through 8 distinct weight sets (as the
layers of a model would), so the graph's launch cost is shared out and each call's weights come from HBM
rather than L2; per-call time = median graph replay time / 16, after warm-up.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass

import torch

from ..api import run
from ..config import SHAPE_PRESETS, PreambleConfig
from ..output import PreambleOutput
from ..weights import PreambleWeights
from .plan import WHATIF_BENCH_ENV, WHATIF_ENV, WHATIF_VARIANTS

CALLS_PER_GRAPH = 16
WEIGHT_SETS = 8
# Bench-only variants of a backend: (backend, environment while capturing). fused-nopdl is the fused kernel
# launched cooperatively without programmatic dependent launch, i.e. without any overlap with the kernel
# before it (in the graph: the previous call), which shows what PDL contributes.
# The what-if variants (plan.WHATIF_VARIANTS) are the fused kernel with parts of its work left out -- wrong
# outputs, timing only -- from cubins built with `python -m megapre build --whatif`.
VARIANTS = {"fused-nopdl": ("fused", {"MEGAPRE_PDL": "0"})}
VARIANTS.update({name: ("fused", {WHATIF_ENV: ",".join(parts), WHATIF_BENCH_ENV: "1"})
                 for name, parts in WHATIF_VARIANTS.items()})


@contextlib.contextmanager
def variant(backend: str):
    """Yields the run() backend for a bench backend name, with the variant's environment set meanwhile."""
    real, env = VARIANTS.get(backend, (backend, {}))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield real
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def git_commit() -> str:
    """The commit measured: MEGAPRE_COMMIT where the tree travels without .git (the GPU machine)."""
    if os.environ.get("MEGAPRE_COMMIT"):
        return os.environ["MEGAPRE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


@dataclass
class Case:
    """Inputs, weights and output buffers for CALLS_PER_GRAPH consecutive calls."""
    config: PreambleConfig
    m: int
    weights: list
    hidden: list
    residual: list
    outs: list

    @classmethod
    def make(cls, config: PreambleConfig, m: int, device, seed: int = 0, n_sets: int = WEIGHT_SETS):
        weights = [PreambleWeights.random(config, seed + i, device) for i in range(n_sets)]
        g = torch.Generator(device=device).manual_seed(seed + 1000)
        hidden = [torch.randn(m, config.hidden_size, generator=g, device=device).to(torch.bfloat16)
                  for _ in range(n_sets)]
        residual = [torch.randn(m, config.hidden_size, generator=g, device=device).to(torch.bfloat16)
                    for _ in range(n_sets)]
        outs = [PreambleOutput.empty(config, m, device) for _ in range(n_sets)]
        return cls(config, m, weights, hidden, residual, outs)

    def call(self, i: int, backend: str):
        j = i % len(self.weights)
        return run(self.hidden[j], self.residual[j], self.weights[j], backend=backend, out=self.outs[j])


def capture_graph(case: Case, backend: str, warm_replays: int = 5) -> torch.cuda.CUDAGraph:
    """One CUDA graph of CALLS_PER_GRAPH calls, captured after a warm-up on the capture stream, replayed
    ``warm_replays`` times. The graph that bench times and profile traces."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream: JIT, module loads, per-stream workspaces
        for i in range(CALLS_PER_GRAPH):
            case.call(i, backend)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            for i in range(CALLS_PER_GRAPH):
                case.call(i, backend)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(warm_replays):
        graph.replay()
    torch.cuda.synchronize()
    return graph


def time_graph(case: Case, backend: str, replays: int = 50) -> float:
    """Per-call microseconds: median replay of a graph of CALLS_PER_GRAPH calls, divided by that count."""
    graph = capture_graph(case, backend)
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / CALLS_PER_GRAPH)
    return statistics.median(times)


def time_eager_cpu(case: Case, backend: str, reps: int = 5) -> float:
    case.call(0, backend)
    ts = []
    for i in range(reps):
        t0 = time.perf_counter()
        case.call(i, backend)
        ts.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(ts)


def count_kernels(case: Case, backend: str) -> int:
    """GPU kernels launched by one call, counted by the torch profiler (CUPTI)."""
    from torch.profiler import ProfilerActivity, profile
    case.call(0, backend)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        case.call(1, backend)
        torch.cuda.synchronize()
    n = 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and not any(
                s in ev.name.lower() for s in ("memcpy", "memset")):
            n += 1
    return n


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes (read + written) per second."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) / 1000.0)
    return nbytes / statistics.median(ts)


@dataclass
class Row:
    shape: str
    m: int
    backend: str
    us_per_call: float | None
    kernels_per_call: int | None
    weight_bytes: int
    floor_us: float | None
    fraction_of_copy_rate: float | None
    error: str | None = None


def bench(shapes=("ep8", "tp1"), ms=(1, 2, 4, 8), backends=("unfused", "fused", "fused-nopdl"), device=None,
          replays: int = 50) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    bw = copy_bandwidth(device) if on_gpu else None
    rows: list[Row] = []
    # Every timing first, the kernel counts after all of them: the torch profiler (CUPTI) that counts kernels
    # made the graph replays timed after it slower -- at 19b4e4c the fused bench read 8.62 us at EP8 M = 1 where
    # the same helper, never after a profiler, read 7.45 in the same run (scripts/sweep_fused.py).
    for shape in shapes:
        cfg = SHAPE_PRESETS[shape]()
        wbytes = cfg.weight_bytes()
        floor = wbytes / bw * 1e6 if bw else None
        for m in ms:
            case = Case.make(cfg, m, device)
            for backend in backends:
                try:
                    with variant(backend) as real:
                        us = time_graph(case, real, replays) if on_gpu else time_eager_cpu(case, real)
                    # (a what-if build does not move every weight byte: no fraction of the floor for it)
                    frac = (floor / us) if floor and backend not in WHATIF_VARIANTS else None
                    rows.append(Row(shape, m, backend, us, None, wbytes, floor, frac))
                except Exception as e:  # a backend that cannot run here is reported, not fatal
                    rows.append(Row(shape, m, backend, None, None, wbytes, floor, None,
                                    error=f"{type(e).__name__}: {e}"))
            del case
            if on_gpu:
                torch.cuda.empty_cache()
    if on_gpu:
        counted = {(r.shape, r.m, r.backend): r for r in rows if r.error is None}
        for shape in shapes:
            for m in ms:
                case = Case.make(SHAPE_PRESETS[shape](), m, device, n_sets=2)  # count_kernels makes two calls
                for backend in backends:
                    if (shape, m, backend) in counted:
                        with variant(backend) as real:
                            counted[shape, m, backend].kernels_per_call = count_kernels(case, real)
    return {
        "device": device_name(device),
        "timing": ("CUDA graph of 16 calls over 8 weight sets, median replay / 16" if on_gpu
                   else "CPU eager, median wall time of one call"),
        "copy_rate_bytes_per_s": bw,
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "rows": [asdict(r) for r in rows],
    }


def format_table(result: dict) -> str:
    lines = [f"device: {result['device']}   timing: {result['timing']}"]
    if result["copy_rate_bytes_per_s"]:
        lines.append(f"copy rate (read + write): {result['copy_rate_bytes_per_s'] / 1e12:.2f} TB/s; "
                     f"floor = weight bytes / copy rate")
    lines.append(f"{'shape':<6}{'M':>3}  {'backend':<10}{'us/call':>10}{'kernels':>9}{'weights MB':>12}"
                 f"{'floor us':>10}{'floor/time':>11}  {'vs unfused':>10}")
    base = {(r["shape"], r["m"]): r["us_per_call"] for r in result["rows"] if r["backend"] == "unfused"}
    for r in result["rows"]:
        us = r["us_per_call"]
        if us is None:
            lines.append(f"{r['shape']:<6}{r['m']:>3}  {r['backend']:<10}  n/a: {r['error']}")
            continue
        ref = base.get((r["shape"], r["m"]))
        speedup = f"{ref / us:9.2f}x" if ref and r["backend"] != "unfused" else ""
        floor = f"{r['floor_us']:10.2f}" if r["floor_us"] else f"{'-':>10}"
        frac = f"{r['fraction_of_copy_rate']:10.0%}" if r["fraction_of_copy_rate"] else f"{'-':>10}"
        nk = f"{r['kernels_per_call']:9d}" if r["kernels_per_call"] is not None else f"{'-':>9}"
        lines.append(f"{r['shape']:<6}{r['m']:>3}  {r['backend']:<10}{us:10.2f}{nk}"
                     f"{r['weight_bytes'] / 1e6:12.2f}{floor}{frac} {speedup:>10}")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
