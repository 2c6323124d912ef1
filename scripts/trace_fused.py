"""Timeline of one fused launch from in-kernel timestamps: per stage, when its tasks were taken, when their
dependencies were met, when they finished (us from the first ticket), and the stamped points inside tile 0
of each stage (megakernel.py's stamp calls). GPU machine; needs traced cubins (python -m megapre build --trace).
Usage: python3 scripts/trace_fused.py [--graph] [--dump=STAGE ...] [shape:M ...]   (default ep8:1 ep8:4 ep8:8 tp1:8)
--dump=STAGE: also list that stage's tasks one by one (CTA, the stage of the CTA's previous task, times).
--json=PATH: also write every run's task records and stamped points to PATH (one JSON object per run).
--graph: trace the 16th call of a replayed CUDA graph of 16 traced calls and 2 untraced ones after them (the
bench's steady state: under PDL each call's CTAs start while the previous call's last tasks run, so the first
"taken" can precede its end; the untraced successors, another cubin with its own workspace, make the traced
call's tail run beside the next call's weight loads, as every call but the last of a graph does -- a trace
of the graph's last call missed that and showed tails up to ~1 us shorter than the per-call time implies);
without it, the last of 20 eager calls, each of which finds the GPU idle."""
import os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megapre
from megapre.host import fused

POINTS = {  # what each stamp slot means (megakernel.py)
    "norm": ("start", "row sum of squares done", "stores done"),
    "router": ("ready", "x staged", "mma done"),
    "gate_up": ("ready", "a_q staged", "mma done"),
    "route": ("ready", "logits summed", "groups chosen", "lists sorted", "8 picks", "weights stored",
              "ranks", "sort done"),
    "act": ("ready", "partials loaded", "done"),
    "down": ("ready", "h staged", "mma done"),
}


def phase_summary(xs, names) -> list[str]:
    """Per kind of CTA (the stage of its task before this one, x["prev"]): how many tasks and the mean time from ready
    to each recorded point and on to done, in us -- where a stage's tasks spend their time, and whether that depends
    on what their CTA ran before (session 22: M = 8 down tasks on norm CTAs)."""
    lines = []
    for kind in sorted({x["prev"] for x in xs}):
        ys = [x for x in xs if x["prev"] == kind and all(p >= 0 for p in x.get("points", [])[1:3])]
        if not ys:
            continue
        marks = [[x["ready"]] + x["points"][1:3] + [x["done"]] for x in ys]
        legs = [sum(m[i + 1] - m[i] for m in marks) / len(ys) / 1000 for i in range(len(marks[0]) - 1)]
        label = " -> ".join(["ready"] + list(names) + ["done"])
        lines.append(f"after {kind:7s} n={len(ys):3d}  {label}: " + " / ".join(f"{v:.2f}" for v in legs)
                     + f"  (max run {max(m[-1] - m[0] for m in marks) / 1000:.2f})")
    return lines


GRAPH = "--graph" in sys.argv
DUMP = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--dump=")]  # stages to list task by task
JSON = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--json=")]
runs = [a.split(":") for a in sys.argv[1:] if a != "--graph" and not a.startswith(("--dump=", "--json="))] or [["ep8", "1"], ["ep8", "4"], ["ep8", "8"], ["tp1", "8"]]
for name, m in runs:
    m = int(m)
    cfg = megapre.config.SHAPE_PRESETS[name]()
    ws = [megapre.PreambleWeights.random(cfg, s, "cuda") for s in range(8)]
    h = torch.randn(m, cfg.hidden_size, device="cuda").bfloat16()
    r = torch.randn(m, cfg.hidden_size, device="cuda").bfloat16()
    out = megapre.PreambleOutput.empty(cfg, m, "cuda")
    if GRAPH:
        stream = torch.cuda.Stream()  # the only stream this spec runs on here (read_trace takes its workspace)
        stream.wait_stream(torch.cuda.current_stream())
        succ_out = megapre.PreambleOutput.empty(cfg, m, "cuda")

        def calls():
            for i in range(16):
                fused.run_fused(h, r, ws[i % 8], out, trace=True)
            for i in range(2):  # successors: the traced call's tail overlaps the next call's start (PDL)
                fused.run_fused(h, r, ws[(16 + i) % 8], succ_out)

        with torch.cuda.stream(stream):
            calls()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            calls()
        for _ in range(5):
            graph.replay()
    else:
        for i in range(20):  # cycle weight sets so the traced launch reads them from HBM
            fused.run_fused(h, r, ws[i % 8], out, trace=True)
    recs = fused.read_trace(cfg, m)
    phases = fused.read_phases(cfg, m)
    if JSON:
        import json
        with open(JSON[0], "a") as f:
            f.write(json.dumps({"shape": name, "m": m, "graph": GRAPH, "records": recs, "phases": phases}) + "\n")
    print(f"== {name} M={m}{' (graph)' if GRAPH else ''}: last task done at {max(x['done'] for x in recs) / 1000:.2f} us "
          f"(PDL {os.environ.get('MEGAPRE_PDL', '1')}, prefetch CTAs {os.environ.get('MEGAPRE_PREFETCH_CTAS', 'default')}, "
          f"prefetch delay {os.environ.get('MEGAPRE_PREFETCH_DELAY_NS', 'default')})")
    for st in ("norm", "router", "route", "gate_up", "act", "down"):
        xs = [x for x in recs if x["stage"] == st]
        us = lambda v: v / 1000
        pts = [f"{lbl} {t:.2f}" for lbl, t in zip(POINTS[st], phases[st]) if t >= 0]
        if not xs:
            print(f"  {st:8s} n=   0 (done inside other tasks)" + (": " + ", ".join(pts) if pts else ""))
            continue
        print(f"  {st:8s} n={len(xs):4d} taken {us(min(x['ticket'] for x in xs)):6.2f}..{us(max(x['ticket'] for x in xs)):6.2f}"
              f"  ready {us(min(x['ready'] for x in xs)):6.2f}..{us(max(x['ready'] for x in xs)):6.2f}"
              f"  done {us(min(x['done'] for x in xs)):6.2f}..{us(max(x['done'] for x in xs)):6.2f}"
              f"  run mean {us(sum(x['done'] - x['ready'] for x in xs) / len(xs)):5.2f} max {us(max(x['done'] - x['ready'] for x in xs)):5.2f}"
              + (f"  failed polls mean {sum(x['retries'] for x in xs) / len(xs):.2f} max {max(x['retries'] for x in xs)}"
                 if any(x.get("retries", 0) for x in xs) else ""))
        print(f"           tile 0: " + ", ".join(pts))
        if st in DUMP:
            prev = {}  # cta -> stage of its task before this one
            for x in sorted(recs, key=lambda x: x["ticket"]):
                x["prev"] = prev.get(x["cta"], "-")
                prev[x["cta"]] = x["stage"]
            for x in sorted(xs, key=lambda x: x["ready"]):
                pts = " ".join(f"{us(p):6.2f}" if p >= 0 else "     -" for p in x.get("points", [])[1:])
                print(f"             tile {x['tile']:3d} cta {x['cta']:3d} after {x['prev']:7s} taken {us(x['ticket']):6.2f}"
                      f" ready {us(x['ready']):6.2f} done {us(x['done']):6.2f}  ({' / '.join(POINTS[st][1:3])}: {pts})"
                      f" failed polls {x.get('retries', 0)}")
            for line in phase_summary(xs, POINTS[st][1:3]):
                print("           " + line)
