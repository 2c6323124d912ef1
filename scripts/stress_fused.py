"""Stress the fused kernel for rare wrong results (GPU machine): many graph replays on inputs copied into the
captured buffers (tests/test_gpu_backends.py::test_graph_replay_changing_inputs, N times instead of 20) and
many eager calls, each output checked against the reference; prints the failures by kind.
Usage: python3 scripts/stress_fused.py [replays] [M] [ep8|tp1]   (MEGAPRE_PDL=0 for the cooperative launch)"""
import collections, os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megapre
from megapre.config import SHAPE_PRESETS
from megapre.host.reference import reference
from tests.compare import check_output

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
m = int(sys.argv[2]) if len(sys.argv) > 2 else 4
cfg = SHAPE_PRESETS[sys.argv[3] if len(sys.argv) > 3 else "ep8"]()
w = megapre.PreambleWeights.random(cfg, seed=7, device="cuda")


def inputs(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = 0.5 + torch.rand(m, 1, generator=g, device="cuda") * 4
    return [(torch.randn(m, cfg.hidden_size, generator=g, device="cuda") * scale).to(torch.bfloat16) for _ in range(2)]


worst = collections.defaultdict(float)  # the largest value of each tolerance's quantity seen


def check(out, h, r, kinds, what):
    want = reference(h, r, w)
    d = out.shared_out.double() - want.shared_out.double()
    worst["shared_out rel"] = max(worst["shared_out rel"], (d.norm() / want.shared_out.double().norm()).item())
    worst["shared_out max/max|ref|"] = max(worst["shared_out max/max|ref|"],
                                           d.abs().max().item() / want.shared_out.double().abs().max().item())
    worst["a_scale rel"] = max(worst["a_scale rel"],
                               ((out.a_scale.double() - want.a_scale.double()).abs() / want.a_scale.double()).max().item())
    try:
        check_output(out, want, w)
    except AssertionError as e:
        kinds[(what, str(e).splitlines()[0][:90])] += 1


kinds = collections.Counter()
hidden, residual = inputs(1)
out = megapre.PreambleOutput.empty(cfg, m, "cuda")
megapre.run(hidden, residual, w, backend="fused", out=out)
torch.cuda.synchronize()
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    megapre.run(hidden, residual, w, backend="fused", out=out)
for i in range(n):
    h, r = inputs(1000 + i)
    hidden.copy_(h)
    residual.copy_(r)
    out.poison()
    g.replay()
    check(out, h, r, kinds, "graph")
for i in range(n):
    h, r = inputs(5000 + i)
    out.poison()
    megapre.run(h, r, w, backend="fused", out=out)
    check(out, h, r, kinds, "eager")
print(f"M={m} PDL={os.environ.get('MEGAPRE_PDL', '1')}: {n} graph replays + {n} eager calls, "
      f"{sum(kinds.values())} failed")
print("  worst: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
for (what, msg), c in sorted(kinds.items()):
    print(f"  {c:4d} {what}: {msg}")
