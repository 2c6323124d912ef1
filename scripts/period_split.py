"""Where one call's period goes in the bench's steady state, from the bench build itself (GPU machine).

The graph traces (scripts/trace_fused.py) stamp every task and run slower than the bench build (0.15-0.85 us per call,
session 18), so they cannot split the period. The what-if build "stamps" (python -m megapre build --whatif) is the
fused kernel with all its work and only two time stamps per CTA: when its first griddepcontrol.wait returned and
when it left. This script replays the bench's graph (16 calls over 8 weight sets) with it and splits each call k of a
replay (after the first) into
  chain    = the last CTA of call k leaving - the first wait of call k returning  (the call's dependency chains)
  boundary = the first wait of call k + 1 returning - the last CTA of call k leaving (grid completion + PDL release)
  period   = chain + boundary = the first wait of call k + 1 - the first wait of call k
and shows how the CTAs' waits and exits spread, and how often the route's CTA (TP8: the grid's last, which takes the
queue's first task) is the last to leave rather than a down task's. It also benches fused and fused-stamps per call, so that the stamps'
cost is visible in the same run.

Usage (GPU machine; the what-if cubins built here and carried in .megapre-cache):
  python3 scripts/period_split.py [--shapes ep8] [--m 1 2 4 8] [--replays 20] [--json FILE]"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from megapre.config import SHAPE_PRESETS  # noqa: E402
from megapre.host import bench, fused  # noqa: E402
from megapre.host.plan import PERIOD_CTAS, PERIOD_SLOTS, STAGE_NAMES, KernelSpec, task_table  # noqa: E402


def read_calls(spec, ws, grid: int) -> list[dict]:
    """Per launch slot: the CTAs' (wait, exit) stamps in us, ordered by the first wait (launch order)."""
    lay = spec.ws_layout()
    rec = ws[lay["period"]: lay["period"] + PERIOD_SLOTS * PERIOD_CTAS * 16].view(torch.int64)
    rec = rec.view(PERIOD_SLOTS, PERIOD_CTAS, 2)[:, :grid].cpu()
    calls = []
    for slot in range(PERIOD_SLOTS):
        waits = [int(w) for w in rec[slot, :, 0] if int(w) > 0]
        exits = [int(e) for e in rec[slot, :, 1] if int(e) > 0]
        if len(waits) < grid or len(exits) < grid:
            continue
        last_cta = max(range(grid), key=lambda b: int(rec[slot, b, 1]))
        calls.append(dict(slot=slot, wait_first=min(waits), wait_last=max(waits), exit_first=min(exits),
                          exit_last=max(exits), exits=sorted(exits), last_cta=last_cta,
                          exit_route=int(rec[slot, grid - 1, 1])))
    return sorted(calls, key=lambda c: c["wait_first"])


def split(config_name: str, m: int, replays: int, device) -> dict:
    cfg = SHAPE_PRESETS[config_name]()
    case = bench.Case.make(cfg, m, device)
    row = dict(shape=config_name, m=m)
    for name in ("fused", "fused-stamps"):
        with bench.variant(name) as backend:
            row[f"{name}_us"] = bench.time_graph(case, backend)
    with bench.variant("fused-stamps") as backend:
        graph = bench.capture_graph(case, backend)
        spec = KernelSpec.from_config(cfg, m)  # (MEGAPRE_WHATIF=stamps while the variant is on)
        ws = fused.workspace_of(spec, device)  # (the graph's: the workspace made last)
        grid = spec.launch_grid(torch.cuda.get_device_properties(device).multi_processor_count)
        chain, boundary, period, wait_spread, exit_q, route_last = [], [], [], [], [], []
        route_gap, last_first_stage = [], []
        rows = task_table(spec)
        first_stage = {b: STAGE_NAMES[rows[b][0]] for b in range(spec.n_static(grid))}  # a static CTA's first task
        for _ in range(replays):
            graph.replay()
            torch.cuda.synchronize()
            calls = read_calls(spec, ws, grid)
            if len(calls) != PERIOD_SLOTS:
                raise RuntimeError(f"expected {PERIOD_SLOTS} complete launches, read {len(calls)}")
            for a, b in zip(calls[1:], calls[2:]):  # (the replay's first call follows the previous replay's end)
                chain.append((a["exit_last"] - a["wait_first"]) / 1000)
                boundary.append((b["wait_first"] - a["exit_last"]) / 1000)
                period.append((b["wait_first"] - a["wait_first"]) / 1000)
                wait_spread.append((a["wait_last"] - a["wait_first"]) / 1000)
                ex = [(e - a["wait_first"]) / 1000 for e in a["exits"]]
                exit_q.append([ex[0], ex[len(ex) // 2], ex[int(len(ex) * 0.9)], ex[-1]])
                # TP8 grids end with the route's CTA (no static task: it takes the queue's first task, the route)
                route_last.append(a["last_cta"] == grid - 1)
                route_gap.append((a["exit_last"] - a["exit_route"]) / 1000)
                last_first_stage.append(first_stage.get(a["last_cta"], "none"))
    med = statistics.median
    row.update(grid=grid, replays=replays, calls=len(period), period_us=med(period), chain_us=med(chain),
               boundary_us=med(boundary), wait_spread_us=med(wait_spread),
               exits_us={q: med(e[i] for e in exit_q) for i, q in enumerate(("first", "median", "p90", "last"))},
               chain_range_us=[min(chain), max(chain)], boundary_range_us=[min(boundary), max(boundary)],
               route_cta_last=sum(route_last) / len(route_last), route_cta_before_last_us=med(route_gap),
               last_cta_first_task={k: last_first_stage.count(k) for k in sorted(set(last_first_stage))})
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["ep8"])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}; per call, medians over the replays' calls 2..15 "
          f"(times from the call's first griddepcontrol.wait return)", flush=True)
    print("shape  M  fused  stamps | period  chain  boundary | waits spread | CTAs leave: first  median  p90  last | "
          "route's CTA: last / leaves before the last by | the last CTA's first task")
    rows = []
    for shape in args.shapes:
        for m in args.m:
            r = split(shape, m, args.replays, device)
            rows.append(r)
            e = r["exits_us"]
            print(f"{shape:5s} {m:2d}  {r['fused_us']:5.2f}  {r['fused-stamps_us']:5.2f}  | {r['period_us']:5.2f}  "
                  f"{r['chain_us']:5.2f}  {r['boundary_us']:5.2f}    | {r['wait_spread_us']:5.2f}        | "
                  f"{e['first']:5.2f}  {e['median']:5.2f}  {e['p90']:5.2f}  {e['last']:5.2f} | "
                  f"{100 * r['route_cta_last']:3.0f} % / {r['route_cta_before_last_us']:4.2f} | "
                  f"{r['last_cta_first_task']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(device), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
