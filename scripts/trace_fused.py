"""Timeline of one fused launch from in-kernel timestamps: per stage, when its tasks were taken, when their
dependencies were met, when they finished (us from the first ticket). GPU machine; needs traced cubins
(python -m megapre build --trace)."""
import os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megapre
from megapre.host import fused

RUNS = [("ep8", megapre.PreambleConfig.deepseek_v3_ep8(), 1, "1"), ("ep8", megapre.PreambleConfig.deepseek_v3_ep8(), 1, "0"),
        ("ep8", megapre.PreambleConfig.deepseek_v3_ep8(), 8, "0"), ("tp1", megapre.PreambleConfig.deepseek_v3(), 8, "0")]
for name, cfg, m, no_prefetch in RUNS:
    os.environ["MEGAPRE_NO_PREFETCH"] = no_prefetch
    ws = [megapre.PreambleWeights.random(cfg, s, "cuda") for s in range(8)]
    h = torch.randn(m, 7168, device="cuda").bfloat16(); r = torch.randn(m, 7168, device="cuda").bfloat16()
    out = megapre.PreambleOutput.empty(cfg, m, "cuda")
    for i in range(20):  # cycle weight sets so the traced launch reads them from HBM
        fused.run_fused(h, r, ws[i % 8], out, trace=True)
    recs = fused.read_trace(cfg, m)
    print(f"== {name} M={m}{' (no L2 prefetch)' if no_prefetch == '1' else ''}: last task done at {max(x['done'] for x in recs) / 1000:.2f} us")
    for st in ("norm", "router", "route", "gate_up", "act", "down"):
        xs = [x for x in recs if x["stage"] == st]
        us = lambda v: v / 1000
        print(f"  {st:8s} n={len(xs):4d} taken {us(min(x['ticket'] for x in xs)):6.2f}..{us(max(x['ticket'] for x in xs)):6.2f}"
              f"  ready {us(min(x['ready'] for x in xs)):6.2f}..{us(max(x['ready'] for x in xs)):6.2f}"
              f"  done {us(min(x['done'] for x in xs)):6.2f}..{us(max(x['done'] for x in xs)):6.2f}"
              f"  run mean {us(sum(x['done'] - x['ready'] for x in xs) / len(xs)):5.2f} max {us(max(x['done'] - x['ready'] for x in xs)):5.2f}")
