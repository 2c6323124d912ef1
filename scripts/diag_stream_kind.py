"""Which part of the next call's weight stream slows a chain's burst: the HBM -> L2 fills, or the L2 -> SM returns?
(GPU machine; cubins built here.)

Session 29 (diag_order.py) found a chain burst's cost under the stream to be its own requests' latency: a 14-KB act
burst that takes ~0.4 us idle takes ~1.4 us while the other SMs pull 64-KB weight chunks from HBM into registers, as
the next call's early CTAs do (they issue their weight loads under PDL, before griddepcontrol.wait). Those loads
are two legs: HBM -> L2 and L2 -> SM. If the latency comes from the second, the next call's CTAs could ask only for
the first before their wait (cp.async.bulk.prefetch.L2, one instruction per row) and load from L2 after it, while
their norm runs. This probe times the burst under streams from the other CTAs (CONFIGS):
- idle: nothing;
- ld:   64-KB chunks from a 512-MB buffer (HBM) into registers, 16-byte ld.global.nc by 8 warps (the weights' way);
- pf:   the same chunks as L2 bulk prefetches from thread 0 (HBM -> L2 only), 8 pieces of 8 KB per chunk, at once or
        paced (250 ns apart);
- ld stagN: one such chunk, warp w of the streaming CTA asking for its 8 KB N * w ns after warp 0;
- l2:   64-KB chunks of an 8-MB L2-resident buffer into registers, 16-byte ld.global.cg (L2 -> SM only; what the
        loads after the wait would add to the call's own start).
Steady streams (8 chunks per CTA, far longer than the probe) and start-up bursts (one chunk per CTA, 8.4 MB: what
the next call's early CTAs ask for as they start), the probe's burst going out 0.2-4 us after the stream starts.
Two bursts, as the chains have them, each read from a freshly rewritten (L2-resident) 64-KB row:
- act14: 14 KB by warps 0-1, 16-byte ld.relaxed.gpu (a TP8 down task's act at M = 1);
- row28: 28 KB by all 8 warps, 16-byte ld.global.cg (a norm task's hidden + residual rows).
One CTA of 256 threads per SM; the grid's last CTA waits, then times the burst with %globaltimer (from a
barrier to a barrier after every thread has its data).

Build here:  python scripts/diag_stream_kind.py build          (cubins into .diag-build/stream_kind/)
Run there:   python3 scripts/diag_stream_kind.py run [--json F] (torch + cuda-python, no DSL)"""
import json
import os
import statistics
import sys

from _diag_cli import STREAM_CHUNK, STREAM_CHUNKS, STREAM_THREADS as THREADS, open_probe

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", ".diag-build", "stream_kind")
BURSTS = (("act14", 14336, 2, "relaxed"), ("row28", 28672, 8, "cg"))
L2_CHUNKS = 128  # 8 MB
PIECES = 8  # a prefetched chunk goes out as 8 bulk prefetches of 8 KB
SLOT = 65536
SLOTS = 8
# (label, stream kind, chunks per streaming CTA, ns the probe waits before its burst, ns between prefetch pieces):
# the steady streams (131 x 8 x 64 KB = 69 MB, ~17 us of HBM: still running when the burst goes out at 4 us), then
# a start-up burst of 64 KB per streaming CTA (8.4 MB, as the next call's early CTAs ask for at their start) by
# register loads (at once, or warp w 100 / 200 ns x w later), by prefetches at once, or by prefetches paced over
# 1.75 us, the probe's burst at 0.2-2.4 us after it
CONFIGS = [("idle", 0, 0, 4000, 0), ("ld x8", 1, 8, 4000, 0), ("pf x8", 2, 8, 4000, 0), ("l2 x48", 3, 48, 4000, 0)]
for _w in (200, 800, 1600, 2400):
    CONFIGS += [(f"ld x1 @{_w}", 1, 1, _w, 0), (f"pf x1 @{_w}", 2, 1, _w, 0), (f"pf x1 paced @{_w}", 2, 1, _w, 250),
                (f"ld x1 stag100 @{_w}", 4, 1, _w, 100), (f"ld x1 stag200 @{_w}", 4, 1, _w, 200)]


def build():
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int32, Int64, Uint32
    from cutlass.memory import SmemAllocator
    sys.path.insert(0, os.path.join(HERE, ".."))
    from megapre.device import primitives as P
    from _diag_dsl import add_cubin, start_after, stream_chunk, use_twice, weight_stream, write_manifest

    def make(nbytes: int, warps: int, load_kind: str):
        per_thread = nbytes // (warps * 32 * 16)
        load = P.ld_relaxed_v4 if load_kind == "relaxed" else P.ld_cg_v4
        smem_words = THREADS + 16

        @cute.kernel
        def k(slot: Int64, hbm: Int64, l2buf: Int64, out: Int64, kind: Int32, chunk0: Int32, n_stream: Int32,
              wait_ns: Int32, gap_ns: Int32):
            tid = cute.arch.thread_idx()[0]
            bid = cute.arch.block_idx()[0]
            nb = cute.arch.grid_dim()[0]
            s = SmemAllocator().allocate_tensor(Int32, cute.make_layout(smem_words), byte_alignment=128)
            scratch = Int32(s.iterator.toint())
            if bid < nb - 1:
                acc = Uint32(0)
                if kind == 1:
                    acc = weight_stream(hbm, n_stream, chunk0)
                elif kind == 2:
                    if tid == 0:
                        # PIECES pieces per chunk; with gap_ns > 0 piece j goes out gap_ns * j after the first
                        t_first = P.globaltimer()
                        j = Int32(0)
                        for i in cutlass.range(n_stream, unroll=1):
                            c = (chunk0 + i * (nb - 1) + bid) % STREAM_CHUNKS
                            for q in cutlass.range(PIECES, unroll=1):
                                t = P.globaltimer()
                                while t - t_first < Int64(gap_ns) * Int64(j):
                                    t = P.globaltimer()
                                P.prefetch_l2_bulk(hbm + Int64(c) * STREAM_CHUNK + Int64(q * (STREAM_CHUNK // PIECES)),
                                                   Int32(STREAM_CHUNK // PIECES))
                                j = j + 1
                elif kind == 4:
                    # register loads as kind 1, one chunk, warp w asking for its 8 KB gap_ns * w after warp 0
                    t_first = P.globaltimer()
                    t = t_first
                    while t - t_first < Int64(gap_ns) * Int64(tid >> 5):
                        t = P.globaltimer()
                    c = (chunk0 + bid) % STREAM_CHUNKS
                    acc = stream_chunk(hbm + Int64(c) * STREAM_CHUNK + Int64(tid * 16) + (t >> 62), THREADS,
                                       STREAM_CHUNK)
                elif kind == 3:
                    for i in cutlass.range(n_stream, unroll=1):
                        c = (i * (nb - 1) + bid) % L2_CHUNKS
                        base = l2buf + Int64(c) * STREAM_CHUNK + Int64(tid * 16)
                        acc = acc ^ use_twice([P.ld_cg_v4(base + Int64(j * THREADS * 16))
                                               for j in range(STREAM_CHUNK // (THREADS * 16))])
                if acc == Uint32(0x7F123457):
                    P.st_b32(out + Int64(64 + bid * 4), acc)
            else:
                t0 = start_after(wait_ns)
                src = slot + (t0 >> 62)  # (+0: every address waits for the start stamp)
                warp = tid >> 5
                acc = Uint32(0)
                if warp < warps:
                    acc = use_twice([load(src + Int64((j * warps * 32 + tid) * 16)) for j in range(per_thread)])
                P.sts_b32(scratch + tid * 4, Int32(acc))  # (the use stays above the barrier: a shared store)
                cute.arch.sync_threads()
                t1 = P.globaltimer()
                if tid == 0:
                    P.st_u64(out, t1 - t0)
                if acc == Uint32(0x7F123457):
                    P.st_b32(out + Int64(64 + tid * 4), acc)

        k.set_name_prefix(f"diag_stream_kind_{nbytes // 1024}k", remove_cutlass_symbol=True, keep_mangled_name=False)

        @cute.jit
        def host(slot: Int64, hbm: Int64, l2buf: Int64, out: Int64, kind: Int32, chunk0: Int32, n_stream: Int32,
                 wait_ns: Int32, gap_ns: Int32, grid: Int32):
            k(slot, hbm, l2buf, out, kind, chunk0, n_stream, wait_ns, gap_ns).launch(grid=[grid, 1, 1],
                                                                                     block=[THREADS, 1, 1])

        return host, smem_words * 4

    os.makedirs(OUT_DIR, exist_ok=True)
    manifest = {}
    for nm, nbytes, warps, load_kind in BURSTS:
        host, smem = make(nbytes, warps, load_kind)
        add_cubin(manifest, OUT_DIR, nm, host, (Int64(0), Int64(0), Int64(0), Int64(0), Int32(0), Int32(0), Int32(0),
                                                Int32(0), Int32(0), Int32(1)), smem,
                  ["u64", "u64", "u64", "u64", "s32", "s32", "s32", "s32", "s32"], bytes=nbytes, warps=warps,
                  load=load_kind)
    write_manifest(OUT_DIR, manifest)


def run(json_path=None):
    import torch
    _, kernels, dev, sms, name = open_probe(OUT_DIR)
    hbm = torch.randint(0, 255, (STREAM_CHUNKS * STREAM_CHUNK,), dtype=torch.uint8, device=dev)
    l2buf = torch.randint(0, 255, (L2_CHUNKS * STREAM_CHUNK,), dtype=torch.uint8, device=dev)
    slots = torch.randint(0, 255, (SLOTS * SLOT,), dtype=torch.uint8, device=dev)
    out = torch.zeros(4096, dtype=torch.int64, device=dev)
    print(f"device: {name}, {sms} SMs; one SM pulls an L2-resident burst, @ns after its start, while the other SMs "
          f"idle, load xN 64-KB chunks each from HBM into registers (ld), L2-prefetch them (pf; paced: 8-KB pieces "
          f"250 ns apart) or load L2-resident chunks (l2); ns from the first request to the burst in registers, median "
          f"of {SLOTS - 1} trials (after one untimed), two rounds", flush=True)
    results = []
    chunk0 = 0
    for rnd in range(2):
        for label, kind, n_stream, wait_ns, gap_ns in CONFIGS:
            line = [f"{label:18s} r{rnd}"]
            for nm, k in kernels.items():
                ns = []
                for trial in range(SLOTS):
                    slots[trial * SLOT: (trial + 1) * SLOT].add_(0)  # rewrite: L2-resident, not in L1
                    if kind == 3:
                        l2buf.add_(0)
                    k.launch((slots.data_ptr() + trial * SLOT, hbm.data_ptr(), l2buf.data_ptr(), out.data_ptr(),
                              kind, chunk0, n_stream, wait_ns, gap_ns), grid=sms)
                    chunk0 = (chunk0 + max(n_stream, 1) * (sms - 1)) % STREAM_CHUNKS
                    torch.cuda.synchronize()
                    if trial:
                        ns.append(int(out[0].item()))
                med = statistics.median(ns)
                results.append(dict(burst=nm, round=rnd, config=label, kind=kind, n_stream=n_stream,
                                    wait_ns=wait_ns, gap_ns=gap_ns, ns=med, trials=ns))
                line.append(f"{nm} {med:6.0f} ns")
            print("  |  ".join(line), flush=True)
    if json_path:
        json.dump(dict(device=name, rows=results), open(json_path, "w"), indent=1)


if __name__ == "__main__":
    from _diag_cli import main
    main(__doc__, build, run)
