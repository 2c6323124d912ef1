"""How fast one SM pulls a burst of L2-resident data, by load path (GPU machine; cubins built here with CuTe DSL).

The fused kernel's chains are full of such bursts: a norm task reads its token's whole row (28 KB), a TP8 down task
the gate_up partials of all of h (14 KB x M: 57 KB at M = 4), the route the router partials. Session 27
(diag_mem_latency.py) timed one of them at ~0.65 us idle and ~1 us under the weight stream for 28 KB -- ~45 / ~28 B
per ns, well below the ~127 B per ns (64 B per clock) of an SM's L2 path, so the limit looks like the loads in flight
per SM, not bytes per clock. This probe asks whether another path or more issuing warps move a burst faster:
- cg / relaxed / nc: 16-byte ld.global.cg / ld.relaxed.gpu (the flagged consumers' load) / ld.global.nc (the
  weights' load) by the first `warps` warps of the CTA, every load issued before any is used;
- ldgsts: 16-byte cp.async.cg into shared memory by all 8 warps, then cp.async.wait_all;
- bulk: one thread asks the TMA unit for 2-KB bulk copies (cp.async.bulk) into shared memory, completing on one
  mbarrier that every thread waits on.
One CTA of 256 threads per SM; the grid's last CTA waits 4 us, then times the burst (%globaltimer, from a barrier to
a barrier after every thread has its data) while the other CTAs idle or stream 64-KB chunks from a 512-MB buffer
(HBM), as the megakernel's CTAs stream their weights. Each trial reads another 64-KB-aligned L2-resident row.

Build here:  python scripts/diag_burst.py build          (cubins into .diag-build/burst/)
Run there:   python3 scripts/diag_burst.py run [--json F] (torch + cuda-python, no DSL)"""
import json
import os
import statistics
import sys

from _diag_cli import STREAM_CHUNK, STREAM_CHUNKS, STREAM_THREADS as THREADS, open_probe

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", ".diag-build", "burst")
SIZES = (14336, 28672, 57344)
BULK_CHUNK = 2048
# (mode, issuing warps)
VARIANTS = (("cg", 2), ("cg", 8), ("relaxed", 2), ("relaxed", 8), ("nc", 8), ("ldgsts", 8), ("bulk", 1))
ROW_SLOTS = 8  # rows of 64 KB, one per trial
WAIT_NS = 4000


def name_of(mode, warps, size):
    return f"{mode}_w{warps}_{size // 1024}k"


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

    def make(mode: str, warps: int, size: int):
        per_thread = size // (warps * 32 * 16) if mode not in ("bulk", "ldgsts") else size // (THREADS * 16)
        smem_words = (size if mode in ("bulk", "ldgsts") else 0) // 4 + THREADS + 16

        # (plain functions, traced inline: their Python loops unroll)
        def burst_loads(src, tid):
            load = {"cg": P.ld_cg_v4, "relaxed": P.ld_relaxed_v4, "nc": P.ld_nc_v4}[mode]
            return use_twice([load(src + Int64((j * warps * 32 + tid) * 16)) for j in range(per_thread)])

        def burst_ldgsts(src, sb, tid):
            for j in range(per_thread):
                off = (j * THREADS + tid) * 16
                cp_async_16(sb + off, src + Int64(off))
            cp_async_commit()
            cp_async_wait_all()

        def burst_bulk(src, sb, bar):
            mbar_expect(bar, Int32(size))
            for c in range(size // BULK_CHUNK):
                bulk_g2s(sb + c * BULK_CHUNK, src + Int64(c * BULK_CHUNK), Int32(BULK_CHUNK), bar)

        @cute.kernel
        def k(row: Int64, sbuf: Int64, out: Int64, n_stream: Int32, chunk0: Int32):
            tid = cute.arch.thread_idx()[0]
            bid = cute.arch.block_idx()[0]
            nb = cute.arch.grid_dim()[0]
            s = SmemAllocator().allocate_tensor(Int32, cute.make_layout(smem_words), byte_alignment=128)
            sb = Int32(s.iterator.toint())
            bar = sb + (smem_words - 16) * 4
            scratch = sb + (smem_words - 16 - THREADS) * 4
            if bid < nb - 1:
                # the weight stream: 64-KB chunks from HBM, 16 loads of 16 bytes per thread per chunk
                acc = weight_stream(sbuf, n_stream, chunk0)
                if acc == Uint32(0x7F123457):
                    P.st_b32(out + Int64(64 + bid * 4), acc)
            else:
                if cutlass.const_expr(mode == "bulk"):
                    if tid == 0:
                        mbar_init(bar)
                t0 = start_after(Int32(WAIT_NS))
                src = row + (t0 >> 62)  # (+0: the burst's addresses wait for the start stamp)
                acc = Uint32(0)
                warp = tid >> 5
                if cutlass.const_expr(mode in ("cg", "relaxed", "nc")):
                    if warp < warps:
                        acc = burst_loads(src, tid)
                elif cutlass.const_expr(mode == "ldgsts"):
                    burst_ldgsts(src, sb, tid)
                    acc = Uint32(P.lds_b32(sb + tid * 16))
                else:
                    if tid == 0:
                        burst_bulk(src, sb, bar)
                    mbar_wait(bar, Int32(0))
                    acc = Uint32(P.lds_b32(sb + tid * 16))
                P.sts_b32(scratch + tid * 4, Int32(acc))  # (the use stays above the barrier: a shared store)
                cute.arch.sync_threads()
                t1 = P.globaltimer()
                if tid == 0:
                    P.st_u64(out, t1 - t0)
                if acc == Uint32(0x7F123457):
                    P.st_b32(out + Int64(64 + tid * 4), acc)

        k.set_name_prefix(f"diag_burst_{name_of(mode, warps, size)}", remove_cutlass_symbol=True,
                          keep_mangled_name=False)

        @cute.jit
        def host(row: Int64, sbuf: Int64, out: Int64, n_stream: Int32, chunk0: Int32, grid: Int32):
            k(row, sbuf, out, n_stream, chunk0).launch(grid=[grid, 1, 1], block=[THREADS, 1, 1])

        return host, smem_words * 4

    os.makedirs(OUT_DIR, exist_ok=True)
    manifest = {}
    for mode, warps in VARIANTS:
        for size in SIZES:
            nm = name_of(mode, warps, size)
            host, smem = make(mode, warps, size)
            add_cubin(manifest, OUT_DIR, nm, host, (Int64(0), Int64(0), Int64(0), Int32(0), Int32(0), Int32(1)), smem,
                      ["u64", "u64", "u64", "s32", "s32"], mode=mode, warps=warps, size=size)
    write_manifest(OUT_DIR, manifest)


def run(json_path=None):
    import torch
    man, kernels, dev, sms, name = open_probe(OUT_DIR)
    sbuf = torch.randint(0, 255, (STREAM_CHUNKS * STREAM_CHUNK,), dtype=torch.uint8, device=dev)
    rows = torch.randint(0, 255, (ROW_SLOTS * 65536,), dtype=torch.uint8, device=dev)
    out = torch.zeros(4096, dtype=torch.int64, device=dev)
    print(f"device: {name}, {sms} SMs; time from a barrier to a barrier once every thread has its data, median of "
          f"{ROW_SLOTS - 1} trials (after one untimed)", flush=True)
    results = []
    chunk0 = 0
    for nm, m in man.items():
        k = kernels[nm]
        line = [f"{nm:18s}"]
        for streaming in (0, 8):
            ts = []
            for trial in range(ROW_SLOTS):
                rows[trial * 65536: trial * 65536 + m["size"]].add_(0)  # rewrite the row: L2-resident, not in L1
                k.launch((rows.data_ptr() + trial * 65536, sbuf.data_ptr(), out.data_ptr(), streaming, chunk0),
                         grid=sms)
                chunk0 = (chunk0 + streaming * (sms - 1)) % STREAM_CHUNKS
                torch.cuda.synchronize()
                if trial:
                    ts.append(int(out[0].item()))
            ns = statistics.median(ts)
            results.append(dict(variant=nm, mode=m["mode"], warps=m["warps"], bytes=m["size"],
                                stream=bool(streaming), ns=ns, trials=ts, bytes_per_ns=m["size"] / ns))
            line.append(f"{'stream' if streaming else 'idle'} {ns:6.0f} ns ({m['size'] / ns:5.1f} B/ns)")
        print("  ".join(line), flush=True)
    if json_path:
        json.dump(dict(device=name, rows=results), open(json_path, "w"), indent=1)


if __name__ == "__main__":
    from _diag_cli import main
    main(__doc__, build, run)
