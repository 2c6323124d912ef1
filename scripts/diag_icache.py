"""Cold code under a weight stream (GPU machine, Triton): how long one CTA takes to run a straight-line block of N
FFMAs the first time, right after, and again after an idle gap, with the other SMs streaming loads from HBM (as
the megakernel's CTAs stream their weights) and without. The fused kernel's traces keep showing stages whose
first pass on an SM is far slower than a warm pass (the route's warm-up pass, the act at M = 8); this measures
what instruction fetch alone costs, apart from any memory access of the code itself.

The probe is the grid's last program: it waits WAIT_NS (the stream is then running), then runs the block three
times in a dynamic loop -- one copy of the code -- with an idle spin of GAP_NS before the third pass, and records
each pass's %globaltimer span (the block's input depends on the start stamp and the end stamp on its output, so
neither moves across it). 8 independent FFMA chains, one warp per scheduler: ~1 instruction per clock when warm.
Usage: python3 scripts/diag_icache.py [--json FILE]"""
import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

from _diag_stream import CHUNK, N_STREAM, spin, stream, stream_buffer, timer

WAIT_NS = 4000
GAP_NS = 5000


@triton.jit
def icache_probe(buf, sink, times, n_stream, a, b, wait_ns, gap_ns,
                 N: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    last = tl.num_programs(0) - 1
    lanes = tl.arange(0, BLOCK)
    if pid < last:
        stream(buf, sink, pid, last, n_stream, CHUNK)
    else:
        zero_i = lanes * 0
        t = spin(zero_i, wait_ns)
        x0 = lanes.to(tl.float32) + (t >> 62).to(tl.float32)
        x1 = x0 + 1.0
        x2 = x0 + 2.0
        x3 = x0 + 3.0
        x4 = x0 + 4.0
        x5 = x0 + 5.0
        x6 = x0 + 6.0
        x7 = x0 + 7.0
        for rep in range(3):
            if rep == 2:  # idle before the third pass: does the code stay?
                t = spin(zero_i, gap_ns)
            t0 = tl.max(timer(x0.to(tl.int32, bitcast=True)), axis=0)
            x0 = x0 + (t0 >> 62).to(tl.float32)
            for j in tl.static_range(N // 8):
                x0 = x0 * a + b
                x1 = x1 * a + b
                x2 = x2 * a + b
                x3 = x3 * a + b
                x4 = x4 * a + b
                x5 = x5 * a + b
                x6 = x6 * a + b
                x7 = x7 * a + b
            s = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
            t1 = tl.max(timer(s.to(tl.int32, bitcast=True)), axis=0)
            tl.store(times + rep, t1 - t0)
            x0 = s
        tl.store(sink + pid, tl.sum(x0.to(tl.int32, bitcast=True), axis=0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    buf = stream_buffer(sms)
    sink = torch.zeros(sms, dtype=torch.int32, device="cuda")
    times = torch.zeros(3, dtype=torch.int64, device="cuda")
    rows = []
    for n in (1024, 2048, 4096):
        for streaming in (0, N_STREAM):
            for warps in (4, 8):
                res = []
                for trial in range(7):
                    icache_probe[(sms,)](buf, sink, times, streaming, 1.0000001, 1e-7, WAIT_NS, GAP_NS,
                                         N=n, CHUNK=CHUNK, BLOCK=32 * warps, num_warps=warps)
                    torch.cuda.synchronize()
                    res.append(times.tolist())
                cold, warm, after_gap = (statistics.median(r[i] for r in res) for i in range(3))
                row = dict(ffma=n, stream=bool(streaming), warps=warps, cold_ns=cold, warm_ns=warm,
                           after_gap_ns=after_gap)
                rows.append(row)
                print(f"N = {n:4d} FFMA  {'stream' if streaming else 'idle  '}  warps {warps}: cold {cold:6.0f} ns, "
                      f"warm {warm:6.0f} ns, warm after {GAP_NS} ns idle {after_gap:6.0f} ns  "
                      f"(cold - warm {cold - warm:6.0f} ns = {(cold - warm) / n:.2f} ns per instruction)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(dev), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
