"""100,000 fused launches in CUDA-graph replay with changing inputs; every 1000th checked (bitwise against a
result verified with the reference), and the replay time of each block of 1000 reported to show no drift."""
import os, sys, statistics
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megapre
from megapre.host.reference import reference
from tests.compare import check_output

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
cfg = megapre.PreambleConfig.deepseek_v3_ep8(ep_rank=1)
m = 4
w = megapre.PreambleWeights.random(cfg, 5, "cuda")
sets = []
for i in range(8):
    g = torch.Generator(device="cuda").manual_seed(100 + i)
    h = torch.randn(m, 7168, generator=g, device="cuda").bfloat16()
    r = torch.randn(m, 7168, generator=g, device="cuda").bfloat16()
    out = megapre.run(h, r, w, backend="fused")
    check_output(out, reference(h, r, w), w)
    sets.append((h, r, out))
hs, rs = torch.empty_like(sets[0][0]), torch.empty_like(sets[0][1])
o = megapre.PreambleOutput.empty(cfg, m, "cuda")
st = torch.cuda.Stream()
st.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(st):
    megapre.run(hs.copy_(sets[0][0]), rs.copy_(sets[0][1]), w, backend="fused", out=o)
torch.cuda.synchronize()
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g, stream=st):
    megapre.run(hs, rs, w, backend="fused", out=o)
bad, block_us = 0, []
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
for b in range(N // 1000):
    e0.record()
    for i in range(1000):
        h, r, _ = sets[(b * 1000 + i) % 8]
        hs.copy_(h)
        rs.copy_(r)
        g.replay()
    e1.record()
    e1.synchronize()
    block_us.append(e0.elapsed_time(e1) * 1000 / 1000)
    want = sets[(b * 1000 + 999) % 8][2]
    same = all(torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                           y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y)
               for (_, x), (_, y) in zip(o.items(), want.items()))
    bad += not same
megapre.check_fused()
q = len(block_us) // 10 or 1
print(f"{N} graph replays (2 input copies + 1 fused launch each) on {torch.cuda.get_device_name()}: "
      f"{bad} wrong of {N // 1000} checked; us per iteration: first 10% median "
      f"{statistics.median(block_us[:q]):.2f}, last 10% median {statistics.median(block_us[-q:]):.2f}, "
      f"max block {max(block_us):.2f}")
sys.exit(1 if bad else 0)
