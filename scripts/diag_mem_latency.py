"""L2 hit latency and address translation on one SM, with and without a weight stream on the others (GPU machine,
Triton). The fused kernel's traces have its first L2 reads of a phase taking 0.7-0.9 us (the norm's rows, 28 KB per
CTA, L2-resident); diag_icache.py ruled out instruction fetch. This measures, on the grid's last program while the
other SMs stream 64-KB chunks from HBM (as the megakernel's CTAs stream their weights) or idle:
- chase, one page: a dependent chain of 8-byte L2 hits (ld.global.cg) within one 2-MB page -- the hit latency;
- chase, N pages: the same chain with every hop on another 2-MB page (lines made L2-resident by an earlier launch
  on one SM), twice: the first pass pays this SM's address-translation misses, the second shows what its TLBs keep;
- burst: every thread loads 14 x 8 bytes of a 28-KB L2-resident row at once (the norm's row read) -- the time
  until all are back.
Usage: python3 scripts/diag_mem_latency.py [--json FILE]"""
import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

from _diag_stream import CHUNK, N_STREAM, spin, stream, stream_buffer, timer

WAIT_NS = 4000
PAGE = 2 << 20  # bytes
HOPS = 64


@triton.jit
def touch(chain, n, sink):
    # one program: every chain element read once, so the lines are in L2 (and only this SM's TLB saw the pages)
    acc = tl.zeros([1], dtype=tl.int64)
    idx = tl.zeros([1], dtype=tl.int64)
    for i in range(n):
        idx = tl.load(chain + idx, cache_modifier=".cg")
        acc += idx
    tl.store(sink + tl.arange(0, 1), acc)


@triton.jit
def probe(buf, chain_one, chain_pages, row, sink, times, n_stream, wait_ns, hops, passes,
          CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    last = tl.num_programs(0) - 1
    if pid < last:
        stream(buf, sink, pid, last, n_stream, CHUNK)
    else:
        z = tl.zeros([1], dtype=tl.int64)
        t = spin(z, wait_ns)
        # one page
        t0 = timer(z + t)
        idx = z + (t0 >> 62)  # (0: the first load's address waits for the start stamp)
        for h in range(hops):
            idx = tl.load(chain_one + idx, volatile=True)
        t1 = timer(idx)
        tl.store(times + tl.arange(0, 1), t1 - t0)
        # page after page, `passes` times over the same chain
        idx = z + (t1 >> 62)
        for p in range(passes):
            t0 = timer(idx)
            idx = idx + (t0 >> 62)
            for h in range(hops):
                idx = tl.load(chain_pages + idx, volatile=True)
            t1 = timer(idx)
            tl.store(times + 1 + p + tl.arange(0, 1), t1 - t0)
        # burst: 14 loads of 8 bytes per thread from a 28-KB row, all issued, then used
        lanes = tl.arange(0, BLOCK)
        t0 = tl.max(timer(lanes + (t1 >> 62).to(tl.int32)), axis=0)
        base = lanes * 2 + (t0 >> 62).to(tl.int32)
        s = tl.zeros([BLOCK], dtype=tl.int64)
        for i in tl.static_range(14):
            s += tl.load(row + base + i * (2 * BLOCK), volatile=True)
        t1 = tl.max(timer(s), axis=0)
        tl.store(times + 1 + passes + tl.arange(0, 1), (t1 - t0) + 0 * tl.sum(s, axis=0))
        tl.store(sink + pid + tl.arange(0, 1), tl.sum(idx, axis=0).to(tl.int32))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    warps = 8
    buf = stream_buffer(sms)
    sink = torch.zeros(sms, dtype=torch.int32, device="cuda")
    per_page = PAGE // 8
    # chain within one page: HOPS lines 4 KB apart (element indices), cyclic
    chain_one = torch.zeros(per_page, dtype=torch.int64, device="cuda")
    one = [(h * 4096 // 8) for h in range(HOPS)]
    for h in range(HOPS):
        chain_one[one[h]] = one[(h + 1) % HOPS]
    rows = []
    row = torch.randint(0, 7, (7168 * 2,), dtype=torch.int64, device="cuda")  # 28 KB of int64... x 4: L2-resident
    for n_pages in (8, 32, 128):
        chain_pages = torch.zeros(n_pages * per_page, dtype=torch.int64, device="cuda")
        # hop h on page (h * 5) % n_pages, at a line offset that moves around the page
        pos = [((h * 5) % n_pages) * per_page + (h * 4096 * 3 % PAGE) // 8 for h in range(HOPS)]
        assert len(set(pos)) == HOPS
        for h in range(HOPS):
            chain_pages[pos[h]] = pos[(h + 1) % HOPS]
        # the chain must start at element 0: rotate so that hop 0 is at index 0 (pos[0] = 0 by construction)
        assert pos[0] == 0 and one[0] == 0
        times = torch.zeros(8, dtype=torch.int64, device="cuda")
        for streaming in (0, N_STREAM):
            res = []
            for trial in range(7):
                touch[(1,)](chain_pages, HOPS, sink, num_warps=1)
                touch[(1,)](chain_one, HOPS, sink, num_warps=1)
                probe[(sms,)](buf, chain_one, chain_pages, row, sink, times, streaming, WAIT_NS, HOPS, 3,
                              CHUNK=CHUNK, BLOCK=32 * warps, num_warps=warps)
                torch.cuda.synchronize()
                res.append(times.tolist())
            med = [statistics.median(r[i] for r in res) for i in range(5)]
            row_ = dict(pages=n_pages, stream=bool(streaming), one_page_ns_per_hop=med[0] / HOPS,
                        pages_ns_per_hop=[m / HOPS for m in med[1:4]], burst_ns=med[4])
            rows.append(row_)
            print(f"{n_pages:3d} pages {'stream' if streaming else 'idle  '}: one page {med[0] / HOPS:6.0f} ns/hop; "
                  f"page per hop, passes 1-3: {' / '.join(f'{m / HOPS:.0f}' for m in med[1:4])} ns/hop; "
                  f"burst of 14 loads / thread {med[4]:.0f} ns", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(dev), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
