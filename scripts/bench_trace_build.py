"""Per-call time (the bench's method: a graph of 16 calls over 8 weight sets, median replay / 16) of the bench build
and of the trace build of the fused kernel, interleaved, two rounds. The trace build's stamps change how ptxas
schedules a stage (session 16: act-spread; session 18: M = 7's second act unit), so a trace only explains a bench
number where the two builds time alike. GPU machine, repository root; needs both builds' cubins
(`python -m megapre build --shapes ep8 --m ...` and the same with --trace).
Usage: python3 scripts/bench_trace_build.py [M ...]   (EP8; default 6 7 8)"""
import sys
sys.path.insert(0, '.')
import megapre
from megapre.host import bench, fused


class Build:
    """bench.time_graph's case for one build: the bench's calls (Case.make's inputs and weight sets) straight into
    run_fused, the trace build or not."""

    def __init__(self, case: bench.Case, trace: bool):
        self.case, self.trace = case, trace

    def call(self, i: int, backend: str):
        c, j = self.case, i % len(self.case.weights)
        return fused.run_fused(c.hidden[j], c.residual[j], c.weights[j], c.outs[j], trace=self.trace)


cfg = megapre.config.SHAPE_PRESETS["ep8"]()
ms = [int(a) for a in sys.argv[1:]] or [6, 7, 8]
cases = {m: bench.Case.make(cfg, m, "cuda") for m in ms}
for rnd in range(2):
    for m in ms:
        us = [bench.time_graph(Build(cases[m], trace), "fused") for trace in (False, True)]
        print(f"round {rnd} M={m} bench-build {us[0]:.2f} us  trace-build {us[1]:.2f} us", flush=True)
