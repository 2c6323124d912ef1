"""Command line: ``python -m megapre {demo,bench,build,profile}``."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .host.plan import WHATIF_VARIANTS


def _device(arg: str | None) -> torch.device:
    return torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))


def cmd_demo(args) -> int:
    from . import PreambleConfig, PreambleWeights, run
    from .api import choose_backend
    from .host import bench
    from .host.reference import reference

    dev = _device(args.device)
    cfg = PreambleConfig.deepseek_v3_ep8(ep_rank=args.ep_rank)
    m = args.m
    print(f"megapre demo: DeepSeek-V3.1 MoE pre-amble, EP8 rank {cfg.ep_rank} (local experts "
          f"{cfg.first_local_expert}..{cfg.first_local_expert + cfg.n_local_experts - 1}), shared expert TP8, "
          f"M={m}, device {bench.device_name(dev)}")
    w = PreambleWeights.random(cfg, seed=0, device=dev)
    g = torch.Generator(device=dev).manual_seed(1)
    hidden = torch.randn(m, cfg.hidden_size, generator=g, device=dev).to(torch.bfloat16)
    residual = torch.randn(m, cfg.hidden_size, generator=g, device=dev).to(torch.bfloat16)
    auto = choose_backend("auto", dev, m, cfg)
    out = run(hidden, residual, w)
    print(f"backend auto -> {auto}")
    ref = reference(hidden, residual, w)
    for t in range(m):
        ids = out.topk_ids[t].tolist()
        ws = out.topk_weights[t].tolist()
        local = [i for i in ids if cfg.first_local_expert <= i < cfg.first_local_expert + cfg.n_local_experts]
        pairs = " ".join(f"{i}:{x:.3f}" for i, x in zip(ids, ws))
        print(f"  token {t}: experts {pairs}   ({len(local)} local)")
    ntpp = int(out.num_tokens_post_padded.item())
    used = out.expert_ids[: ntpp // cfg.moe_block_size].tolist()
    print(f"  sorted for the fused MoE: {ntpp} slots in {len(used)} blocks of {cfg.moe_block_size}, "
          f"local experts {used}")
    same_ids = bool((out.topk_ids == ref.topk_ids).all())
    err = (out.shared_out.float() - ref.shared_out.float()).abs().max().item()
    print(f"  agreement with the float64 reference: routing {'identical' if same_ids else 'differs (see tests)'}, "
          f"shared_out max abs err {err:.3g} (max |ref| {ref.shared_out.float().abs().max().item():.3g})")
    backends = [b for b in ("unfused", "fused") if b == auto or b == "unfused" or dev.type == "cuda"]
    case = bench.Case.make(cfg, m, dev)
    for b in backends:
        try:
            if dev.type == "cuda":
                us = bench.time_graph(case, b)
                print(f"  {b:>8}: {us:7.2f} us per call (CUDA graph of 16 calls over 8 weight sets)")
            else:
                us = bench.time_eager_cpu(case, b, reps=3)
                print(f"  {b:>8}: {us / 1000:7.1f} ms per call (CPU, eager)")
        except Exception as e:
            print(f"  {b:>8}: not available here ({type(e).__name__}: {e})")
    return 0


def cmd_bench(args) -> int:
    from .host import bench
    dev = _device(args.device)
    if dev.type != "cuda":
        print("megapre bench: no CUDA device; timing the CPU paths eagerly (not comparable to GPU numbers)")
    res = bench.bench(shapes=args.shapes, ms=args.m, backends=args.backends, device=dev, replays=args.replays)
    print(bench.format_table(res))
    path = args.json or os.path.join("profiles", "bench.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    bench.write_json(res, path)
    print(f"wrote {path}")
    return 0


def cmd_build(args) -> int:
    from .host import build
    return build.main(args)


def cmd_profile(args) -> int:
    from .host import profile
    return profile.main(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megapre", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="one call on random DeepSeek-V3.1 weights: routing summary, per-backend time")
    d.add_argument("--m", type=int, default=4)
    d.add_argument("--ep-rank", type=int, default=0)
    d.add_argument("--device", default=None)
    d.set_defaults(fn=cmd_demo)
    b = sub.add_parser("bench", help="per-call time of each backend x M x shapes; table + JSON")
    b.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8])
    b.add_argument("--shapes", nargs="+", default=["ep8", "tp1"], choices=["ep8", "tp1"])
    b.add_argument("--backends", nargs="+", default=["unfused", "fused", "fused-nopdl"],
                   choices=["unfused", "fused", "fused-nopdl", "reference", *WHATIF_VARIANTS],
                   help="fused-nopdl: the fused kernel without programmatic dependent launch; fused-no-* / "
                        "fused-skeleton / fused-queue / fused-launch: what-if builds with parts of the work left "
                        "out (wrong outputs, timing only; build them with `build --whatif`)")
    b.add_argument("--replays", type=int, default=50)
    b.add_argument("--device", default=None)
    b.add_argument("--json", default=None, help="where to write the JSON (default profiles/bench.json)")
    b.set_defaults(fn=cmd_bench)
    bl = sub.add_parser("build", help="compile the fused kernel's cubins for the presets into the cache")
    bl.add_argument("--m", type=int, nargs="+", default=list(range(1, 9)))
    bl.add_argument("--shapes", nargs="+", default=["ep8", "tp1"])
    bl.add_argument("--trace", action="store_true", help="the timeline-recording variant (scripts/trace_fused.py)")
    bl.add_argument("--whatif", action="store_true",
                    help="the bench's what-if variants (fused-no-norm ... fused-launch) instead of the real kernel")
    bl.add_argument("--prune", action="store_true",
                    help="first delete the cache entries built from other kernel sources (stale after an edit; they "
                         "would otherwise be carried to the GPU machine and listed by gpu-check's sass step)")
    bl.set_defaults(fn=cmd_build)
    pr = sub.add_parser("profile", help="kernels of one call of each backend under Nsight Systems (else the torch "
                                        "profiler): tables, timeline PNG, markdown, JSON")
    pr.add_argument("--m", type=int, nargs="+", default=[1, 4, 8])
    pr.add_argument("--shapes", nargs="+", default=["ep8"], choices=["ep8", "tp1"])
    pr.add_argument("--out", default="profiles", help="folder for profile-<shape>-m<M>.{md,png,json,nsys-rep}")
    pr.add_argument("--tool", default="auto", choices=["auto", "nsys", "torch"],
                    help="auto: nsys where found (MEGAPRE_NSYS, PATH, the GPU machine's path), else torch")
    pr.add_argument("--replays", type=int, default=5, help="graph replays profiled per backend")
    pr.add_argument("--device", default=None)
    pr.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: the run under nsys
    pr.set_defaults(fn=cmd_profile)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
