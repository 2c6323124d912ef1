"""Launch-setting sweep of the fused kernel (GPU machine): per-call time (bench's definition) with PDL on/off,
the L2 weight prefetch shared by N CTAs, and a delay before the CTAs that do not start on a norm task issue theirs (and their first weight loads). Usage: python3 scripts/sweep_fused.py [--json PATH]"""
import json, os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megapre
from megapre.host import bench

# (PDL, prefetch CTAs, delay in ns before the non-norm CTAs load and prefetch weights)
SETTINGS = [("1", "132", "0"), ("1", "64", "0"), ("1", "0", "0"), ("1", "132", "300"), ("1", "132", "600"),
            ("0", "132", "0")]
rows = []
for shape, m in (("ep8", 1), ("ep8", 2), ("ep8", 8), ("tp1", 1), ("tp1", 8)):
    case = bench.Case.make(megapre.config.SHAPE_PRESETS[shape](), m, "cuda")
    for pdl, pf, delay in SETTINGS:
        os.environ["MEGAPRE_PDL"] = pdl
        os.environ["MEGAPRE_PREFETCH_CTAS"] = pf
        os.environ["MEGAPRE_PREFETCH_DELAY_NS"] = delay
        us = bench.time_graph(case, "fused")
        rows.append(dict(shape=shape, m=m, pdl=pdl, prefetch_ctas=pf, prefetch_delay_ns=delay, us=us))
        print(f"{shape} M={m} PDL={pdl} prefetch CTAs={pf:>4} delay {delay:>4} ns: {us:6.2f} us/call", flush=True)
    del case
print(f"device: {torch.cuda.get_device_name()}  commit: {bench.git_commit()}")
if len(sys.argv) > 2 and sys.argv[1] == "--json":
    json.dump(dict(device=torch.cuda.get_device_name(), commit=bench.git_commit(), rows=rows), open(sys.argv[2], "w"), indent=1)
