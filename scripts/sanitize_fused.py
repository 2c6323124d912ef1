"""A few fused launches (EP8 and TP1, M = 1, 4, 8, or the shape:M pairs given), outputs checked, for compute-sanitizer:
    compute-sanitizer --tool memcheck|racecheck|synccheck python3 scripts/sanitize_fused.py [ep8:8 tp1:1 ...]"""
import os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megapre
from megapre.host.reference import reference
from tests.compare import check_output

CONFIGS = {"ep8": lambda: megapre.PreambleConfig.deepseek_v3_ep8(ep_rank=3), "tp1": megapre.PreambleConfig.deepseek_v3}
runs = [(a.split(":")[0], int(a.split(":")[1])) for a in sys.argv[1:]] or [(s, m) for s in CONFIGS for m in (1, 4, 8)]
weights = {}
for shape, m in runs:
    cfg = CONFIGS[shape]()
    w = weights.setdefault(shape, megapre.PreambleWeights.random(cfg, 1, "cuda"))
    h = torch.randn(m, 7168, device="cuda").bfloat16()
    r = torch.randn(m, 7168, device="cuda").bfloat16()
    out = megapre.PreambleOutput.empty(cfg, m, "cuda").poison()
    megapre.run(h, r, w, backend="fused", out=out)
    torch.cuda.synchronize()
    check_output(out, reference(h, r, w), w)
    print(f"{cfg.short_name()} M={m}: ok", flush=True)
megapre.check_fused()
print("sanitize run complete")
