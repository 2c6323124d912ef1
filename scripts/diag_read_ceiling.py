"""How fast can one call read TP1's 47.7 MB of FP8 weights, by access pattern? (GPU machine, Triton)

Session 13 left this open: the megakernel's TP1 gate_up stream runs at ~3-3.5 TB/s, diag_tile_bandwidth.py's 64 x 1024
tiles (one program each, full occupancy) at ~3 TB/s, yet the copy runs at ~4.1-4.3 TB/s read + write. Is ~3 TB/s the
tile pattern's limit, or does a different way of reading (a pipelined TMA ring into shared memory, one CTA per SM,
as a warp-specialized megakernel would stream) get nearer the card's read rate?

Every pattern reads the same bytes: 8 weight sets of [6656, 7168] uint8 (47.7 MB each, TP1's w13 + w2 + router
bytes), timed by `megapre bench`'s own time_graph -- one CUDA graph of 16 launches cycling through the 8 sets, median
replay / 16 -- so each figure includes one kernel boundary (~1.5 us for a near-empty kernel, GPU-FACTS.md), and the
same per set from one long launch over all 8 sets (no boundary), as MB per us = TB/s.

  flat        16 KB contiguous per program, full occupancy (the plain read ceiling)
  tiles       64 x 1024 strided tiles, one per program, full occupancy (diag_tile_bandwidth.py's pattern);
              "contig": the same bytes pre-tiled, each tile's 64 KB in one run (here and for ldg-1cta x1)
  ldg-1cta xU 132 persistent programs (one CTA of 8 warps per SM), each loops over U consecutive 64 x 1024 tiles
              at a time with register loads: the megakernel's pattern (a task's bytes land in registers, then are
              used; nothing streams while they are folded)
  tma-1cta    the same loop with TMA: 64 x 256 boxes of a 2D tensor descriptor, pipelined num_stages deep into
              shared memory (Triton's software pipeliner issues box i + stages - 1 while box i is folded)

Usage: python3 scripts/diag_read_ceiling.py [--json PATH]"""
import argparse
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megapre.host import bench  # noqa: E402

ROWS, COLS, SETS = 6656, 7168, 8          # one set = 47.7 MB = TP1's weights per call
TR, TC = 64, 1024 // 4                    # the megakernel's TP1 gate_up task tile (64 x 1024 bytes), in int32 words
BOX_C = 64                                # TMA box: 64 rows x 256 bytes (at most 256 elements per dimension)
# Every kernel reads int32 words (16-byte vector loads) and folds them with XOR, so the arithmetic per byte is one
# LOP3 and a thread keeps <= 64 accumulator registers: the loop is bound by the loads, not by the reduction.


@triton.jit
def read_flat(src, out, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    off = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(src + off)                                   # int32 view: 16-byte vector loads
    tl.store(out + pid, tl.xor_sum(x, axis=0))


@triton.jit
def tile_offsets(t, n_tile_c, ld, TR: tl.constexpr, TC: tl.constexpr, CONTIG: tl.constexpr):
    """Word offsets of tile t: TR rows of TC words at the row stride ld (the weight matrix as it is), or -- CONTIG --
    the same bytes pre-tiled, tile t's TR x TC words in one run."""
    r = tl.arange(0, TR)[:, None]
    c = tl.arange(0, TC)[None, :]
    if CONTIG:
        return t.to(tl.int64) * TR * TC + r * TC + c
    return (t // n_tile_c).to(tl.int64) * TR * ld + r * ld + (t % n_tile_c) * TC + c


@triton.jit
def read_tiles(src, out, tile0, n_tile_c, ld, TR: tl.constexpr, TC: tl.constexpr, CONTIG: tl.constexpr):
    x = tl.load(src + tile_offsets(tile0 + tl.program_id(0), n_tile_c, ld, TR, TC, CONTIG))
    tl.store(out + tl.program_id(0), tl.xor_sum(tl.xor_sum(x, axis=1), axis=0))


@triton.jit
def read_tiles_persistent(src, out, tile0, n_tiles, n_tile_c, ld, TR: tl.constexpr, TC: tl.constexpr,
                          U: tl.constexpr, CONTIG: tl.constexpr):
    # U consecutive tiles per iteration, all loads issued before any is used: U x 64 KB in flight per SM
    # (the megakernel's TP1 tasks hold 128 KB: U = 2)
    pid = tl.program_id(0)
    acc = tl.zeros([TR, TC], dtype=tl.int32)
    for i in range(pid * U, n_tiles, tl.num_programs(0) * U):
        x = tl.zeros([TR, TC], dtype=tl.int32)
        for u in tl.static_range(U):
            x ^= tl.load(src + tile_offsets(tile0 + i + u, n_tile_c, ld, TR, TC, CONTIG))
        acc ^= x
    tl.store(out + pid, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


@triton.jit
def read_boxes_tma(desc, out, row0, n_boxes, n_box_c, STAGES: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BR, BC], dtype=tl.int32)
    for i in tl.range(pid, n_boxes, tl.num_programs(0), num_stages=STAGES):
        # box i: row block i // n_box_c, column block i % n_box_c (consecutive boxes of a program are
        # 132 boxes apart; a row block's 28 boxes are read by 28 different SMs at about the same time)
        x = desc.load([row0 + (i // n_box_c) * BR, (i % n_box_c) * BC])
        acc ^= x
    tl.store(out + pid, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


class Calls:
    """bench.time_graph's case for one pattern: call i reads weight set i % SETS (the bench's graph of
    CALLS_PER_GRAPH calls over its weight sets, median replay / CALLS_PER_GRAPH)."""

    def __init__(self, launch):
        self.launch = launch

    def call(self, i: int, backend: str):
        self.launch(i)


def time_once(launch):
    launch(); torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ts = []
    for _ in range(7):
        ev[0].record(); launch(); ev[1].record(); ev[1].synchronize()
        ts.append(ev[0].elapsed_time(ev[1]) * 1e3)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    set_bytes = ROWS * COLS
    buf = torch.randint(0, 255, (SETS * ROWS, COLS), dtype=torch.uint8, device="cuda")
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(1 << 20, dtype=torch.int32, device="cuda")
    words = buf.view(torch.int32)                            # [SETS * ROWS, COLS / 4]
    ld = COLS // 4
    n_tile_c = ld // TC
    tiles_per_set = (ROWS // TR) * n_tile_c
    n_box_c = ld // BOX_C
    boxes_per_set = (ROWS // TR) * n_box_c
    flat_block = 4096                                        # int32 elements: 16 KB per program
    flat = words.view(-1)
    flat_per_set = set_bytes // 4 // flat_block

    patterns = {}

    def flat_launch(k, sets=1):
        base = (k % SETS) * set_bytes // 4
        read_flat[(flat_per_set * sets,)](flat[base:], out, BLOCK=flat_block, num_warps=8)
    patterns["flat"] = flat_launch

    for contig in (False, True):
        def tiles_launch(k, sets=1, contig=contig):
            read_tiles[(tiles_per_set * sets,)](words, out, (k % SETS) * tiles_per_set, n_tile_c, ld, TR=TR, TC=TC,
                                               CONTIG=contig, num_warps=8)
        patterns["tiles" + (" contig" if contig else "")] = tiles_launch

    for unroll, contig in ((1, False), (2, False), (1, True)):
        def ldg_launch(k, sets=1, unroll=unroll, contig=contig):
            read_tiles_persistent[(n_sm,)](words, out, (k % SETS) * tiles_per_set, tiles_per_set * sets, n_tile_c, ld,
                                           TR=TR, TC=TC, U=unroll, CONTIG=contig, num_warps=8)
        patterns[f"ldg-1cta x{unroll}" + (" contig" if contig else "")] = ldg_launch

    desc = TensorDescriptor.from_tensor(words, [TR, BOX_C])
    for stages in (3, 4, 6):
        def tma_launch(k, sets=1, stages=stages):
            read_boxes_tma[(n_sm,)](desc, out, (k % SETS) * ROWS, boxes_per_set * sets, n_box_c,
                                    STAGES=stages, BR=TR, BC=BOX_C, num_warps=4)
        patterns[f"tma-1cta s{stages}"] = tma_launch

    results = {"device": torch.cuda.get_device_name(0), "set_mb": set_bytes / 1e6, "rows": []}
    print(f"{results['device']}: one set = {set_bytes / 1e6:.1f} MB, {n_sm} SMs")
    print(f"{'pattern':16s} {'graph us/call':>13s} {'TB/s':>6s} {'1 launch / 8 sets us':>21s} {'TB/s':>6s}")
    for name, launch in patterns.items():
        try:
            t_call = bench.time_graph(Calls(launch), "diag")
            t_long = time_once(lambda: launch(0, sets=SETS)) / SETS
        except Exception as e:                               # a pattern this Triton cannot build: say so, go on
            print(f"{name:16s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        row = {"pattern": name, "us_per_call": t_call, "tbs_call": set_bytes / t_call / 1e6,
               "us_per_set_long": t_long, "tbs_long": set_bytes / t_long / 1e6}
        results["rows"].append(row)
        print(f"{name:16s} {t_call:13.2f} {row['tbs_call']:6.2f} {t_long:21.2f} {row['tbs_long']:6.2f}", flush=True)
    y = torch.empty_like(buf)
    t_copy = time_once(lambda: y.copy_(buf))
    results["copy_tbs_rw"] = 2 * buf.numel() / t_copy / 1e6
    print(f"copy of all 8 sets: {results['copy_tbs_rw']:.2f} TB/s (read + write)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
