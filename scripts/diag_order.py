"""Does an SM's burst wait behind its own weight loads, by the path those weights take? (GPU machine; cubins built
here.)

Sessions 27-28 found every latency-critical burst of the megakernel's chains -- a down task's act partials, a gate_up
task's a_q poll -- coming back only after the same SM's 32-64 KB of weights, which it asked for first (register
loads; "one L2 -> SM path per SM, in order"). Trials that polled or loaded early (next/down-light-poll,
next/act-spread) lost to it. A design whose weights go through another path could let the bursts pass; this probe
asks which path, if any, does:
- none:   the act burst alone (the baseline);
- nc:     the weights as the megakernel loads them -- 16-byte ld.global.nc into registers by all 8 warps, kept live
          (ptxas may interleave these with the act's loads: see the SASS check in the perf log);
- reg:    the same with ld.relaxed.gpu, which ptxas keeps in program order with the act's (strong) loads;
- ldgsts: 16-byte cp.async.cg into shared memory by all 8 warps (no wait);
- bulk:   2-KB TMA bulk copies (cp.async.bulk) into shared memory from one thread, on one mbarrier.
Then warps 0-1 load a 14-KB act burst (16-byte ld.relaxed.gpu, the flagged consumers' load: the TP8 down task's act
at M = 1) and the CTA stamps %globaltimer once they have it ("act") and once the weights are in too ("weights").
Weights and act rows are L2-resident (rewritten before each trial), as the prefetched weights and the freshly written
partials are. One CTA of 256 threads per SM; the grid's last CTA waits 4 us, then times, while the other CTAs idle or
stream 64-KB chunks from HBM (the next call's weight stream).

Build here:  python scripts/diag_order.py build          (cubins into .diag-build/order/)
Run there:   python3 scripts/diag_order.py run [--json F] (torch + cuda-python, no DSL)"""
import json
import os
import statistics
import sys

from _diag_cli import STREAM_CHUNK, STREAM_CHUNKS, STREAM_THREADS as THREADS, open_probe

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", ".diag-build", "order")
ACT_BYTES = 14336  # 2 warps x 32 lanes x 14 loads of 16 bytes
ACT_WARPS = 2
BULK_CHUNK = 2048
VARIANTS = (("none", 0), ("nc", 32768), ("reg", 32768), ("ldgsts", 32768), ("bulk", 32768), ("reg", 65536),
            ("ldgsts", 65536), ("bulk", 65536))
SLOT = 131072  # one trial's weights (<= 64 KB) and act row, 64 KB each
SLOTS = 8
WAIT_NS = 4000


def name_of(path, wbytes):
    return f"{path}_{wbytes // 1024}k"


def build():
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int32, Int64, Uint32
    from cutlass.memory import SmemAllocator
    sys.path.insert(0, os.path.join(HERE, ".."))
    from megapre.device import primitives as P
    from _diag_dsl import (add_cubin, bulk_g2s, cp_async_16, cp_async_commit, cp_async_wait_all, mbar_expect,
                           mbar_init, mbar_wait, start_after, use_twice, weight_stream, write_manifest)

    def make(path: str, wbytes: int):
        smem_words = (wbytes if path in ("ldgsts", "bulk") else 0) // 4 + 2 * THREADS + 16
        per_thread_w = wbytes // (THREADS * 16)
        per_thread_a = ACT_BYTES // (ACT_WARPS * 32 * 16)

        @cute.kernel
        def k(slots: Int64, sbuf: Int64, out: Int64, n_stream: Int32, chunk0: Int32):
            tid = cute.arch.thread_idx()[0]
            bid = cute.arch.block_idx()[0]
            nb = cute.arch.grid_dim()[0]
            s = SmemAllocator().allocate_tensor(Int32, cute.make_layout(smem_words), byte_alignment=128)
            sb = Int32(s.iterator.toint())
            bar = sb + (smem_words - 16) * 4
            scratch = sb + (smem_words - 16 - 2 * THREADS) * 4
            if bid < nb - 1:
                acc = weight_stream(sbuf, n_stream, chunk0)
                if acc == Uint32(0x7F123457):
                    P.st_b32(out + Int64(64 + bid * 4), acc)
            else:
                if cutlass.const_expr(path == "bulk"):
                    if tid == 0:
                        mbar_init(bar)
                t0 = start_after(Int32(WAIT_NS))
                base = slots + (t0 >> 62)  # (+0: every address waits for the start stamp)
                wsrc = base
                asrc = base + Int64(65536)
                warp = tid >> 5
                # 1. the weights, asked for first
                wv = []
                if cutlass.const_expr(path in ("nc", "reg")):
                    load = P.ld_nc_v4 if path == "nc" else P.ld_relaxed_v4
                    wv = [load(wsrc + Int64((j * THREADS + tid) * 16)) for j in range(per_thread_w)]
                elif cutlass.const_expr(path == "ldgsts"):
                    for j in range(per_thread_w):
                        off = (j * THREADS + tid) * 16
                        cp_async_16(sb + off, wsrc + Int64(off))
                    cp_async_commit()
                elif cutlass.const_expr(path == "bulk"):
                    if tid == 0:
                        mbar_expect(bar, Int32(wbytes))
                        for c in range(wbytes // BULK_CHUNK):
                            bulk_g2s(sb + c * BULK_CHUNK, wsrc + Int64(c * BULK_CHUNK), Int32(BULK_CHUNK), bar)
                # 2. the act burst, right behind them, by warps 0-1
                acc = Uint32(0)
                if warp < ACT_WARPS:
                    acc = use_twice([P.ld_relaxed_v4(asrc + Int64((j * ACT_WARPS * 32 + tid) * 16))
                                     for j in range(per_thread_a)])
                P.sts_b32(scratch + tid * 4, Int32(acc))  # (the use stays above the barrier: a shared store)
                cute.arch.sync_threads()
                t1 = P.globaltimer()
                # 3. the weights' arrival
                wacc = Uint32(0)
                if cutlass.const_expr(path in ("nc", "reg")):
                    wacc = use_twice(wv)
                elif cutlass.const_expr(path == "ldgsts"):
                    cp_async_wait_all()
                    wacc = Uint32(P.lds_b32(sb + tid * 16))
                elif cutlass.const_expr(path == "bulk"):
                    mbar_wait(bar, Int32(0))
                    wacc = Uint32(P.lds_b32(sb + tid * 16))
                P.sts_b32(scratch + (THREADS + tid) * 4, Int32(wacc))
                cute.arch.sync_threads()
                t2 = P.globaltimer()
                if tid == 0:
                    P.st_u64(out, t1 - t0)
                    P.st_u64(out + Int64(8), t2 - t0)
                if (acc ^ wacc) == Uint32(0x7F123457):
                    P.st_b32(out + Int64(64 + tid * 4), acc)

        k.set_name_prefix(f"diag_order_{name_of(path, wbytes)}", remove_cutlass_symbol=True, keep_mangled_name=False)

        @cute.jit
        def host(slots: Int64, sbuf: Int64, out: Int64, n_stream: Int32, chunk0: Int32, grid: Int32):
            k(slots, sbuf, out, n_stream, chunk0).launch(grid=[grid, 1, 1], block=[THREADS, 1, 1])

        return host, smem_words * 4

    os.makedirs(OUT_DIR, exist_ok=True)
    manifest = {}
    for path, wbytes in VARIANTS:
        nm = name_of(path, wbytes)
        host, smem = make(path, wbytes)
        add_cubin(manifest, OUT_DIR, nm, host, (Int64(0), Int64(0), Int64(0), Int32(0), Int32(0), Int32(1)), smem,
                  ["u64", "u64", "u64", "s32", "s32"], path=path, weight_bytes=wbytes)
    write_manifest(OUT_DIR, manifest)


def run(json_path=None):
    import torch
    man, kernels, dev, sms, name = open_probe(OUT_DIR)
    sbuf = torch.randint(0, 255, (STREAM_CHUNKS * STREAM_CHUNK,), dtype=torch.uint8, device=dev)
    slots = torch.randint(0, 255, (SLOTS * SLOT,), dtype=torch.uint8, device=dev)
    out = torch.zeros(4096, dtype=torch.int64, device=dev)
    print(f"device: {name}, {sms} SMs; one SM asks for its weights, then warps 0-1 for a {ACT_BYTES // 1024}-KB act "
          f"burst; ns from the first request to the act in registers / to the weights in too, median of {SLOTS - 1} "
          f"trials (after one untimed)", flush=True)
    results = []
    chunk0 = 0
    for nm, m in man.items():
        k = kernels[nm]
        line = [f"{nm:10s}"]
        for streaming in (0, 8):
            act, wts = [], []
            for trial in range(SLOTS):
                slots[trial * SLOT: (trial + 1) * SLOT].add_(0)  # rewrite: L2-resident, not in L1
                k.launch((slots.data_ptr() + trial * SLOT, sbuf.data_ptr(), out.data_ptr(), streaming, chunk0),
                         grid=sms)
                chunk0 = (chunk0 + streaming * (sms - 1)) % STREAM_CHUNKS
                torch.cuda.synchronize()
                if trial:
                    act.append(int(out[0].item()))
                    wts.append(int(out[1].item()))
            a, w = statistics.median(act), statistics.median(wts)
            results.append(dict(variant=nm, path=m["path"], weight_bytes=m["weight_bytes"], stream=bool(streaming),
                                act_ns=a, weights_ns=w, act_trials=act, weights_trials=wts))
            line.append(f"{'stream' if streaming else 'idle  '} act {a:6.0f} ns, weights in {w:6.0f} ns")
        print("  |  ".join(line), flush=True)
    if json_path:
        json.dump(dict(device=name, rows=results), open(json_path, "w"), indent=1)


if __name__ == "__main__":
    from _diag_cli import main
    main(__doc__, build, run)
