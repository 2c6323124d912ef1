"""Per-call time (the bench's method: a graph of 16 calls over 8 weight sets, median replay / 16) of the bench build
and of the trace build of the fused kernel, interleaved, two rounds. The trace build's stamps change how ptxas
schedules a stage (session 16: act-spread; session 18: M = 7's second act unit), so a trace only explains a bench
number where the two builds time alike. GPU machine, repository root; needs both builds' cubins
(`python -m megapre build --shapes ep8 --m ...` and the same with --trace).
Usage: python3 scripts/bench_trace_build.py [M ...]   (EP8; default 6 7 8)"""
import statistics, sys, torch
sys.path.insert(0, '.')
import megapre
from megapre.host import fused, bench
cfg = megapre.config.SHAPE_PRESETS["ep8"]()
ms = [int(a) for a in sys.argv[1:]] or [6, 7, 8]
cases = {m: bench.Case.make(cfg, m, "cuda") for m in ms}
def timed(m, trace):
    c = cases[m]
    def calls():
        for i in range(16):
            j = i % 8
            fused.run_fused(c.hidden[j], c.residual[j], c.weights[j], c.outs[j], trace=trace)
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        calls()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        calls()
    for _ in range(5): g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(50):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1000 / 16)
    return statistics.median(ts)
for rnd in range(2):
    for m in ms:
        print(f"round {rnd} M={m} bench-build {timed(m, False):.2f} us  trace-build {timed(m, True):.2f} us", flush=True)
