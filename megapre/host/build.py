"""Ahead-of-time build of the megakernel: CuTe DSL -> cubin + manifest, in an on-disk cache.

This is the only module that imports ``cutlass`` (lazily, inside functions). The GPU machine has no DSL: it
loads the cubins this step wrote (``python -m megapre build`` here, then carry the cache folder there).

Cache layout: ``<cache>/<key>/megapre.cubin`` and ``manifest.json``; key = hash of the KernelSpec (config and
M), the arch and the device sources, so editing a kernel source invalidates every entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from ..config import SHAPE_PRESETS
from .plan import THREADS, KernelSpec

ARCH = "sm_90a"
_PKG = Path(__file__).resolve().parent.parent
# Files whose content decides the generated code (fast_div / bf16_ptx: PTX text the primitives emit).
_SOURCES = ("device/megakernel.py", "device/primitives.py", "device/fast_div.py", "device/bf16_ptx.py", "host/plan.py")


def default_cache_dir() -> Path:
    env = os.environ.get("MEGAPRE_CACHE")
    if env:
        return Path(env)
    root = _PKG.parent
    if (root / "pyproject.toml").exists():  # a source checkout: keep cubins beside it (carried to the GPU)
        return root / ".megapre-cache"
    return Path.home() / ".cache" / "megapre"


def source_hash() -> str:
    h = hashlib.sha256()
    for rel in _SOURCES:
        h.update(rel.encode())
        h.update((_PKG / rel).read_bytes())
    return h.hexdigest()[:16]


def cache_key(spec: KernelSpec, arch: str = ARCH) -> str:
    blob = json.dumps({"spec": spec.key_fields(), "arch": arch, "src": source_hash()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_dir(spec: KernelSpec, cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / cache_key(spec)


def _parse_entry(ptx: str):
    m = re.search(r"\.visible \.entry (\w+)\(\s*(.*?)\)", ptx, re.S)
    if not m:
        raise RuntimeError("no .entry in the generated PTX")
    params = [re.sub(r"\s+", " ", p.strip()) for p in m.group(2).split(",") if p.strip()]
    ntid = re.search(r"\.reqntid (\d+), (\d+), (\d+)", ptx)
    return m.group(1), params, [int(x) for x in ntid.groups()] if ntid else None


def compile_spec(spec: KernelSpec, cache_dir: Path | None = None, verbose: bool = False) -> Path:
    """Compile the megakernel for one spec into the cache (no-op if present). Returns the entry folder."""
    why = spec.unsupported()
    if why:
        raise ValueError(f"the megakernel does not support this shape: {why}")
    out = entry_dir(spec, cache_dir)
    if (out / "manifest.json").exists():
        return out
    os.environ.setdefault("CUTE_DSL_ARCH", ARCH)
    import cutlass.cute as cute  # noqa: F401  (the DSL is needed from here on)
    from cutlass import Int32, Int64

    from ..device.megakernel import PARAM_TYPES, PARAMS, build_kernel

    t0 = time.time()
    _, launch = build_kernel(spec)
    import tempfile
    with tempfile.TemporaryDirectory() as dump:  # the DSL writes its kept artifacts there, not into the cwd
        # 21 pointers; n_tasks, first_local, mode, prefetch_ctas, prefetch_delay; grid
        compiled = cute.compile(launch, *([Int64(0)] * 21), Int32(0), Int32(0), Int32(-1), Int32(0), Int32(0), Int32(1),
                                options=f"--gpu-arch {ARCH} --keep-ptx --keep-cubin --dump-dir {dump}")
    ptx, cubin = compiled.artifacts.PTX, compiled.artifacts.CUBIN
    symbol, ptx_params, block = _parse_entry(ptx)
    if len(ptx_params) != len(PARAMS):
        raise RuntimeError(f"kernel has {len(ptx_params)} parameters, expected {len(PARAMS)}")
    if block != [THREADS, 1, 1]:
        raise RuntimeError(f"kernel block {block}, expected [{THREADS}, 1, 1]")
    manifest = {
        "resources": resource_report(ptx),
        "symbol": symbol,
        "params": list(PARAMS),
        "param_types": list(PARAM_TYPES),
        "ptx_params": ptx_params,
        "block": block,
        "dyn_smem_bytes": spec.smem_bytes(),
        "launch": "PDL (programmatic stream serialization) by default; cooperative when MEGAPRE_PDL=0",
        "arch": ARCH,
        "spec": spec.key_fields(),
        "ws_layout": spec.ws_layout(),
        "source_hash": source_hash(),
        "compile_seconds": round(time.time() - t0, 2),
    }
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "megapre.cubin").write_bytes(cubin)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    try:
        tmp.rename(out)
    except OSError:  # another process built it first
        pass
    if verbose:
        print(f"built {symbol} M={spec.m} in {manifest['compile_seconds']} s -> {out}")
    return out


def resource_report(ptx: str) -> dict | None:
    """Registers / spills / stack of the kernel per ptxas -v (when a ptxas is on PATH), else None."""
    import shutil
    import subprocess
    import tempfile
    exe = shutil.which("ptxas")
    if not exe:
        return None
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        r = subprocess.run([exe, f"-arch={ARCH}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, timeout=600)
    text = r.stdout + r.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else None  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack_bytes": num(r"(\d+) bytes stack frame")}


def load_entry(spec: KernelSpec, cache_dir: Path | None = None) -> tuple[bytes, dict] | None:
    d = entry_dir(spec, cache_dir)
    if not (d / "manifest.json").exists():
        return None
    return (d / "megapre.cubin").read_bytes(), json.loads((d / "manifest.json").read_text())


def dsl_available() -> bool:
    try:
        import importlib.util
        return importlib.util.find_spec("cutlass") is not None
    except Exception:
        return False




def prune(cache_dir: Path | None = None) -> tuple[int, int]:
    """Delete the cache entries whose manifest names other device sources than these (an edited kernel leaves its
    old cubins behind under other keys). Returns (removed, kept)."""
    import shutil
    root = Path(cache_dir or default_cache_dir())
    if not root.is_dir():
        return 0, 0
    current, removed, kept = source_hash(), 0, 0
    for entry in root.iterdir():
        # (".tmp": a build in progress in another process, compile_spec's staging folder)
        if not entry.is_dir() or ".tmp" in entry.name:
            continue
        try:
            fresh = json.loads((entry / "manifest.json").read_text()).get("source_hash") == current
        except (OSError, ValueError):
            fresh = False
        if fresh:
            kept += 1
        else:
            shutil.rmtree(entry)
            removed += 1
    return removed, kept


def main(args) -> int:
    """python -m megapre build: fill the cache for the presets and M values -- the fused kernel and its
    stage-by-stage build (fused.run_stages, GPU tests) -- (--trace: the timeline-recording fused kernel; --whatif:
    the bench's what-if variants of it instead)."""
    from .plan import WHATIF_VARIANTS
    if getattr(args, "prune", False):
        removed, kept = prune()
        print(f"pruned {removed} stale entries ({kept} of the current sources kept) in {default_cache_dir()}")
    n = 0
    trace, whatif = getattr(args, "trace", False), getattr(args, "whatif", False)
    # (label, what-if parts, stage-by-stage build)
    variants = [(name, parts, False) for name, parts in WHATIF_VARIANTS.items()] if whatif else [("", None, False)]
    if not (trace or whatif):
        variants.append(("staged", (), True))
    for name, parts, staged in variants:
        for shape in args.shapes:
            for m in args.m:
                spec = KernelSpec.from_config(SHAPE_PRESETS[shape](), m, trace=trace, whatif=parts, staged=staged)
                out = compile_spec(spec, verbose=True)
                man = json.loads((out / "manifest.json").read_text())
                res = man.get("resources") or {}
                print(f"  {shape} M={m}{' ' + name if name else ''}: registers {res.get('registers')}, spills "
                      f"{res.get('spill_stores')}/{res.get('spill_loads')} B, shared memory "
                      f"{man['dyn_smem_bytes']} B, workspace {man['ws_layout']['total']} B")
                n += 1
    print(f"{n} kernels in {default_cache_dir()}")
    return 0
