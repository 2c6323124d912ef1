"""What a producer -> consumer hop between two SMs costs through L2 and through distributed shared memory, idle and
while the other SMs stream weights. (GPU machine; cubins built here.)

Every hop of the megakernel's chains (norm -> router / gate_up -> route / down) goes through L2: the producer's
stores land there, the consumer polls and loads them back. Under the next call's weight stream such a round trip
costs ~1-1.4 us against ~0.3-0.45 idle (diag_order.py, diag_stream_kind.py: the data queued ahead on the L2 -> SM
return path). A thread-block cluster's CTAs can instead write into each other's shared memory (st.async, completing
on the receiver's mbarrier) over the SM-to-SM network inside a GPC. If that path does not queue behind the weight
stream, a design whose chains hop inside clusters could take ~1 us per hop off them (issue 4); if it does, that
redesign is not worth its scheduling problems (session 15). This probe prices one hop of N bytes both ways:
- l2-ctr:  the producer's 256 threads store N bytes (st.global), bar.sync, thread 0 adds a counter (red.release.gpu);
           the consumer's thread 0 polls it (ld.acquire.gpu), bar.sync, all threads load the N bytes (ld.relaxed.gpu)
           -- the counter hop;
- l2-flag: the producer stores N bytes that carry the launch's tag (st.relaxed.gpu), no counter; the consumer loads
           them until no word is stale (bar.red.or vote) -- the flagged-data hop of TP8 M <= 5;
- dsmem:   the producer stores N bytes into the consumer's shared memory (st.async.shared::cluster, 16 bytes per
           instruction, completing on the consumer's mbarrier, expect_tx N); the consumer waits on the mbarrier, then
           reads its shared memory.
from the producer's start stamp (after a bar.sync) to the consumer's stamp after a bar.sync that every thread reaches
with its data in registers. N = 4 KB (h at M = 2: what a down task needs) and 16 KB (~ the act's inputs at M = 1).
Clusters of 2 CTAs (one per SM: 120 KB of shared memory each), the grid's last cluster the probe, the others idle or
streaming 64-KB chunks from HBM into registers (_diag_dsl.weight_stream): steady (8 chunks each), or one chunk each as
a start-up burst with the hop 0.2 / 0.8 / 1.6 us after it.

Build here:  python scripts/diag_dsmem_hop.py build          (cubins into .diag-build/dsmem_hop/)
Run there:   python3 scripts/diag_dsmem_hop.py run [--json F] (torch + cuda-python, no DSL)"""
import json
import os
import statistics
import sys

from _diag_cli import ROOT, STREAM_CHUNK, STREAM_CHUNKS, STREAM_THREADS as THREADS, open_probe, resident_clusters

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", ".diag-build", "dsmem_hop")
SIZES = (4096, 16384)
MODES = ("l2-ctr", "l2-flag", "dsmem")
CLUSTER = 2
SMEM_BYTES = 120 * 1024  # more than half an SM's shared memory: one CTA per SM, so producer and consumer are two SMs
S_MBAR, S_SCRATCH, S_DATA = 0, 1024, 4096  # shared-memory layout (bytes), the same in every CTA of the cluster
SLOT = 65536
TRIALS = 8
# (label, stream kind, chunks per streaming CTA, ns the probe waits before its hop)
CONFIGS = [("idle", 0, 0, 4000), ("ld x8", 1, 8, 4000)] + [(f"ld x1 @{w}", 1, 1, w) for w in (200, 800, 1600)]


def build():
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    import cutlass
    import cutlass.cute as cute
    from cutlass import Int32, Int64, Uint32
    from cutlass.memory import SmemAllocator
    sys.path.insert(0, ROOT)
    from megapre.device import primitives as P
    from _diag_dsl import (add_cubin, mbar_init, mbar_expect, mbar_wait, start_after, use_twice, weight_stream,
                           write_manifest)

    def cluster_sync():
        P._asm([], [], "barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned;", "", True)

    def mapa(saddr, rank):
        return P._asm([Int32], [saddr, rank], "mapa.shared::cluster.u32 $0, $1, $2;", "=r,r,r", True)

    def st_async_v4(raddr, a, b, c, d, rbar):
        P._asm([], [raddr, a, b, c, d, rbar],
               "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [$0], {$1, $2, $3, $4}, [$5];",
               "r,r,r,r,r,r", True)

    def st_v4(addr, a, b, c, d):
        P._asm([], [addr, a, b, c, d], "st.global.v4.b32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r", True)

    def st_relaxed_v4(addr, a, b, c, d):
        P._asm([], [addr, a, b, c, d], "st.relaxed.gpu.global.v4.b32 [$0], {$1, $2, $3, $4};", "l,r,r,r,r", True)

    def lds_v4(saddr):
        return P._asm([Uint32] * 4, [saddr], "ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,r", True)

    def make(nbytes: int, mode: str):
        per_thread = nbytes // (THREADS * 16)

        @cute.kernel
        def k(slot: Int64, flag: Int64, hbm: Int64, out: Int64, seq: Int32, kind: Int32, chunk0: Int32,
              n_stream: Int32, wait_ns: Int32):
            tid = cute.arch.thread_idx()[0]
            bid = cute.arch.block_idx()[0]
            nb = cute.arch.grid_dim()[0]
            s = SmemAllocator().allocate_tensor(Int32, cute.make_layout(SMEM_BYTES // 4), byte_alignment=1024)
            base = Int32(s.iterator.toint())
            if cutlass.const_expr(mode == "dsmem"):
                # the receiver's mbarrier expects the hop's bytes before the producer may write any of them
                if bid == nb - 1 and tid == 0:
                    mbar_init(base + S_MBAR)
                    mbar_expect(base + S_MBAR, Int32(nbytes))
                cluster_sync()
            if bid < nb - CLUSTER:
                acc = Uint32(0)
                if kind == 1:
                    acc = weight_stream(hbm, n_stream, chunk0)
                if acc == Uint32(0x7F123457):
                    P.st_b32(out + Int64(64 + bid * 4), acc)
            elif bid == nb - 2:
                # the producer: wait, stamp, then N bytes of "results" (the launch's tag in every word) to the consumer
                t0 = start_after(wait_ns)
                v = Uint32(seq) + Uint32(t0 >> 62)  # (+0: the values wait for the start stamp)
                if cutlass.const_expr(mode == "dsmem"):
                    rbar = mapa(base + S_MBAR, Int32(1))
                    for j in range(per_thread):
                        st_async_v4(mapa(base + S_DATA + (j * THREADS + tid) * 16, Int32(1)), v, v, v, v, rbar)
                elif cutlass.const_expr(mode == "l2-flag"):
                    for j in range(per_thread):
                        st_relaxed_v4(slot + Int64((j * THREADS + tid) * 16), v, v, v, v)
                else:
                    for j in range(per_thread):
                        st_v4(slot + Int64((j * THREADS + tid) * 16), v, v, v, v)
                    cute.arch.sync_threads()
                    if tid == 0:
                        P.red_release_add(flag, Int32(1))
                if tid == 0:
                    P.st_u64(out + Int64(8), t0)
            else:
                # the consumer: every thread ends with its share of the N bytes in registers
                acc = Uint32(0)
                if cutlass.const_expr(mode == "dsmem"):
                    mbar_wait(base + S_MBAR, Int32(0))
                    acc = use_twice([lds_v4(base + S_DATA + (j * THREADS + tid) * 16) for j in range(per_thread)])
                elif cutlass.const_expr(mode == "l2-flag"):
                    stale = Int32(1)
                    while stale != 0:
                        vals = [P.ld_relaxed_v4(slot + Int64((j * THREADS + tid) * 16)) for j in range(per_thread)]
                        bad = Int32(0)
                        for q in vals:
                            bad = bad | P.sel_i32(q[0] != Uint32(seq), 1, 0) | P.sel_i32(q[3] != Uint32(seq), 1, 0)
                        stale = P.syncthreads_or(bad)
                        acc = use_twice(vals)
                else:
                    if tid == 0:
                        while P.ld_acquire(flag) == 0:
                            pass
                    cute.arch.sync_threads()
                    acc = use_twice([P.ld_relaxed_v4(slot + Int64((j * THREADS + tid) * 16))
                                     for j in range(per_thread)])
                P.sts_b32(base + S_SCRATCH + tid * 4, Int32(acc))  # (the use stays above the barrier)
                cute.arch.sync_threads()
                t1 = P.globaltimer()
                if tid == 0:
                    P.st_u64(out + Int64(16), t1)
                if acc == Uint32(0x7F123457):
                    P.st_b32(out + Int64(64 + tid * 4), acc)
            if cutlass.const_expr(mode == "dsmem"):
                cluster_sync()  # no CTA leaves while its peer may still write into its shared memory

        k.set_name_prefix(f"diag_dsmem_hop_{mode.replace('-', '_')}_{nbytes // 1024}k", remove_cutlass_symbol=True,
                          keep_mangled_name=False)

        @cute.jit
        def host(slot: Int64, flag: Int64, hbm: Int64, out: Int64, seq: Int32, kind: Int32, chunk0: Int32,
                 n_stream: Int32, wait_ns: Int32, grid: Int32):
            k(slot, flag, hbm, out, seq, kind, chunk0, n_stream, wait_ns).launch(
                grid=[grid, 1, 1], block=[THREADS, 1, 1], cluster=[CLUSTER, 1, 1])

        return host

    os.makedirs(OUT_DIR, exist_ok=True)
    manifest = {}
    for mode in MODES:
        for nbytes in SIZES:
            host = make(nbytes, mode)
            add_cubin(manifest, OUT_DIR, f"{mode}-{nbytes // 1024}k", host,
                      (Int64(0), Int64(0), Int64(0), Int64(0), Int32(1), Int32(0), Int32(0), Int32(0), Int32(0),
                       Int32(2)), SMEM_BYTES, ["u64", "u64", "u64", "u64", "s32", "s32", "s32", "s32", "s32"],
                      mode=mode, bytes=nbytes, cluster=CLUSTER)
    write_manifest(OUT_DIR, manifest)


def run(json_path=None):
    import torch
    _, kernels, dev, sms, name = open_probe(OUT_DIR)
    fits = min(resident_clusters(k, sms) for k in kernels.values())
    grid = CLUSTER * min(fits, sms // CLUSTER)
    hbm = torch.randint(0, 255, (STREAM_CHUNKS * STREAM_CHUNK,), dtype=torch.uint8, device=dev)
    slots = torch.zeros(TRIALS * SLOT, dtype=torch.uint8, device=dev)
    flags = torch.zeros(TRIALS * 64, dtype=torch.int32, device=dev)
    out = torch.zeros(4096, dtype=torch.int64, device=dev)
    print(f"device: {name}, {sms} SMs, {fits} clusters of {CLUSTER} resident at once, grid {grid}: one hop of N bytes "
          f"between the last cluster's two SMs while the other {grid - CLUSTER} SMs idle or stream 64-KB chunks from "
          f"HBM into registers (ld x8: steady; ld x1 @ns: a start-up burst, the hop ns after it); ns from the "
          f"producer's start to the consumer holding the data, median of {TRIALS - 1} trials (after one untimed), two "
          f"rounds", flush=True)
    results = []
    chunk0 = 0
    for rnd in range(2):
        for label, kind, n_stream, wait_ns in CONFIGS:
            line = [f"{label:12s} r{rnd}"]
            for nm, k in kernels.items():
                ns = []
                for trial in range(TRIALS):
                    slot = slots[trial * SLOT: (trial + 1) * SLOT]
                    slot.zero_()  # L2-resident, no stale tag
                    flags.zero_()
                    out.zero_()
                    k.launch((slot.data_ptr(), flags.data_ptr() + trial * 256, hbm.data_ptr(), out.data_ptr(),
                              trial + 1, kind, chunk0, n_stream, wait_ns), grid=grid)
                    chunk0 = (chunk0 + max(n_stream, 1) * grid) % STREAM_CHUNKS
                    torch.cuda.synchronize()
                    t0, t1 = int(out[1].item()), int(out[2].item())
                    if t0 == 0 or t1 == 0:
                        raise RuntimeError(f"{nm} {label}: no stamps (t0 {t0}, t1 {t1})")
                    if trial:
                        ns.append(t1 - t0)
                med = statistics.median(ns)
                results.append(dict(hop=nm, mode=k.manifest["mode"], bytes=k.manifest["bytes"], round=rnd, config=label,
                                    kind=kind, n_stream=n_stream, wait_ns=wait_ns, ns=med, trials=ns))
                line.append(f"{nm} {med:5.0f}")
            print("  |  ".join(line), flush=True)
    if json_path:
        json.dump(dict(device=name, grid=grid, clusters_resident=fits, rows=results), open(json_path, "w"), indent=1)


if __name__ == "__main__":
    from _diag_cli import main
    main(__doc__, build, run)
