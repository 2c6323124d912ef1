"""How late thread-block clusters start on SMs that a previous kernel frees one by one (PDL), by cluster size.
(GPU machine; cubins built here.)

diag_dsmem_hop.py found a hop through distributed shared memory immune to the weight stream (0.3 us for 4 KB against
1.2-2.2 us through L2), so a megakernel whose chains hop inside clusters could be ~1 us per hop faster -- if its
clusters start when the previous call's tail lets them. Session 15's norm clusters (8 CTAs) lost there: a cluster
needs all its CTAs' SMs free at once, in one GPC, and the previous call's CTAs leave one by one over ~2.5 us. This
probe prices that. A "tail" kernel holds every SM (one CTA per SM: 120 KB of shared memory), lets its dependents
launch at once (griddepcontrol.launch_dependents), and each CTA leaves after its own time; the "next" kernel (same
shared memory, so one CTA per SM; programmatic dependent launch, clusters of C = 1 / 2 / 4 / 8 / 16) stamps each CTA's
start. Per CTA: its start minus when the tail CTA on its SM (%smid) left. Tail patterns:
- "at once": every tail CTA leaves 3 us after its start (the clusters' own start cost);
(every tail CTA first runs 150 us, so that the next kernel's launch is queued behind it before any CTA leaves)
- "megakernel": leave times shaped as the EP8 M = 1 period split's (half of the CTAs within 2.8-3.3 us, 40 % by 4.9,
  the last 10 % by 5.1), in random order over the SMs.

Build here:  python scripts/diag_cluster_start.py build          (cubins into .diag-build/cluster_start/)
Run there:   python3 scripts/diag_cluster_start.py run [--json F] (torch + cuda-python, no DSL)"""
import json
import os
import random
import statistics
import sys

from _diag_cli import ROOT, STREAM_THREADS as THREADS, open_probe, resident_clusters

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", ".diag-build", "cluster_start")
SIZES = (1, 2, 4, 8, 16)
SMEM_BYTES = 120 * 1024  # more than half an SM's shared memory: one CTA per SM, in either kernel
REC = 4  # int64 per CTA record: smid, start ns, leave ns, (next kernel) cluster id
TRIALS = 6
HOLD_NS = 8000  # how long a next CTA holds its SM (longer than the tail's spread)
BASE_NS = 150_000  # every tail CTA runs this long first, so that the next launch is queued (PDL) before any leaves


def build():
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    import cutlass.cute as cute
    from cutlass import Int32, Int64
    from cutlass.memory import SmemAllocator
    sys.path.insert(0, ROOT)
    from megapre.device import primitives as P
    from _diag_dsl import add_cubin, write_manifest

    def smid():
        return P._asm([Int32], [], "mov.u32 $0, %smid;", "=r", True)

    @cute.kernel
    def tail(rec: Int64, leave_ns: Int64):
        tid = cute.arch.thread_idx()[0]
        bid = cute.arch.block_idx()[0]
        SmemAllocator().allocate_tensor(Int32, cute.make_layout(SMEM_BYTES // 4), byte_alignment=1024)
        t0 = P.globaltimer()
        P.griddep_launch_dependents()
        t_go = t0 + Int64(P.ld_nc_b32(leave_ns + Int64(bid * 4)))
        t = t0
        while t < t_go:
            t = P.globaltimer()
        if tid == 0:
            r = rec + Int64(bid * REC * 8)
            P.st_u64(r, Int64(smid()))
            P.st_u64(r + 8, t0)
            P.st_u64(r + 16, P.globaltimer())

    tail.set_name_prefix("diag_cluster_start_tail", remove_cutlass_symbol=True, keep_mangled_name=False)

    def make_next(c: int):
        @cute.kernel
        def nxt(rec: Int64):
            tid = cute.arch.thread_idx()[0]
            bid = cute.arch.block_idx()[0]
            SmemAllocator().allocate_tensor(Int32, cute.make_layout(SMEM_BYTES // 4), byte_alignment=1024)
            t0 = P.globaltimer()
            if tid == 0:
                r = rec + Int64(bid * REC * 8)
                P.st_u64(r + 8, t0)
                P.st_u64(r, Int64(smid()))
                P.st_u64(r + 24, Int64(bid // c))
            # hold the SM, as a call's CTAs do, so that later CTAs of this kernel need SMs the tail frees
            t = t0
            while t < t0 + Int64(HOLD_NS):
                t = P.globaltimer()

        nxt.set_name_prefix(f"diag_cluster_start_next{c}", remove_cutlass_symbol=True, keep_mangled_name=False)
        if c > 1:
            @cute.jit
            def host(rec: Int64, grid: Int32):
                nxt(rec).launch(grid=[grid, 1, 1], block=[THREADS, 1, 1], cluster=[c, 1, 1])
        else:
            @cute.jit
            def host(rec: Int64, grid: Int32):
                nxt(rec).launch(grid=[grid, 1, 1], block=[THREADS, 1, 1])
        return host

    @cute.jit
    def tail_host(rec: Int64, leave_ns: Int64, grid: Int32):
        tail(rec, leave_ns).launch(grid=[grid, 1, 1], block=[THREADS, 1, 1])

    os.makedirs(OUT_DIR, exist_ok=True)
    manifest = {}
    add_cubin(manifest, OUT_DIR, "tail", tail_host, (Int64(0), Int64(0), Int32(1)), SMEM_BYTES, ["u64", "u64"],
              cluster=1)
    for c in SIZES:
        add_cubin(manifest, OUT_DIR, f"next{c}", make_next(c), (Int64(0), Int32(c)), SMEM_BYTES, ["u64"], cluster=c)
    write_manifest(OUT_DIR, manifest)


def leave_times(pattern: str, n: int, rng: random.Random) -> list[int]:
    """ns after its start at which each tail CTA leaves."""
    if pattern == "at once":
        return [BASE_NS + 3000] * n
    # the EP8 M = 1 period split (session 31): first 2.78, median 3.30, p90 4.86, last 5.06 us after the wait
    times = []
    for i in range(n):
        q = i / max(n - 1, 1)
        if q <= 0.5:
            t = 2780 + (3300 - 2780) * q / 0.5
        elif q <= 0.9:
            t = 3300 + (4860 - 3300) * (q - 0.5) / 0.4
        else:
            t = 4860 + (5060 - 4860) * (q - 0.9) / 0.1
        times.append(BASE_NS + int(t))
    rng.shuffle(times)
    return times


def run(json_path=None):
    import torch
    _, kernels, dev, sms, name = open_probe(OUT_DIR)
    tail = kernels.pop("tail")
    rng = random.Random(0)
    print(f"device: {name}, {sms} SMs; a tail kernel holds every SM and its CTAs leave one by one; the next kernel "
          f"(PDL, clusters of C) stamps its CTAs' starts. Per next CTA: start - when its SM's tail CTA left (us); "
          f"per cluster: start - when the last of its SMs was freed; 'all started': the next kernel's last CTA start "
          f"- the tail's last CTA leaving. Medians over {TRIALS - 1} trials (after one untimed).", flush=True)
    rows = []
    for pattern in ("at once", "megakernel"):
        for nm, k in kernels.items():
            c = k.cluster
            fits = resident_clusters(k, sms)
            grid = c * min(fits, sms // c)
            if grid == 0:
                print(f"{pattern:10s} C = {c:2d}: no cluster fits")
                continue
            per_cta, per_cluster, all_started, p90s = [], [], [], []
            for trial in range(TRIALS):
                leave = torch.tensor(leave_times(pattern, sms, rng), dtype=torch.int32, device=dev)
                rec_t = torch.zeros(sms * REC, dtype=torch.int64, device=dev)
                rec_n = torch.zeros(grid * REC, dtype=torch.int64, device=dev)
                tail.launch((rec_t.data_ptr(), leave.data_ptr()), grid=sms)
                k.launch((rec_n.data_ptr(),), grid=grid, pdl=True)
                torch.cuda.synchronize()
                rt = rec_t.view(sms, REC).cpu().tolist()
                rn = rec_n.view(grid, REC).cpu().tolist()
                freed = {}
                for s, _, left, _ in rt:
                    freed[s] = max(freed.get(s, 0), left)
                if len(freed) != sms or any(r[1] == 0 for r in rn):
                    raise RuntimeError(f"{nm}: {len(freed)} SMs held by the tail, {sum(r[1] == 0 for r in rn)} "
                                       f"next CTAs without a stamp")
                if not trial:
                    continue
                d = [(r[1] - freed[r[0]]) / 1000 for r in rn]
                per_cta.append(statistics.median(d))
                p90s.append(sorted(d)[int(len(d) * 0.9)])
                clusters = {}
                for r in rn:
                    clusters.setdefault(r[3], []).append(r)
                per_cluster.append(statistics.median(
                    (min(r[1] for r in cl) - max(freed[r[0]] for r in cl)) / 1000 for cl in clusters.values()))
                all_started.append((max(r[1] for r in rn) - max(freed.values())) / 1000)
            row = dict(pattern=pattern, cluster=c, grid=grid, clusters_resident=fits,
                       cta_after_its_sm=statistics.median(per_cta), cta_after_its_sm_p90=statistics.median(p90s),
                       cluster_after_its_last_sm=statistics.median(per_cluster),
                       all_started_after_tail=statistics.median(all_started))
            rows.append(row)
            print(f"{pattern:10s} C = {c:2d} (grid {grid:3d}, {fits:3d} resident): CTA after its SM freed median "
                  f"{row['cta_after_its_sm']:5.2f} p90 {row['cta_after_its_sm_p90']:5.2f} | cluster after its last "
                  f"SM freed {row['cluster_after_its_last_sm']:5.2f} | all started "
                  f"{row['all_started_after_tail']:5.2f} after the tail's last CTA", flush=True)
    if json_path:
        json.dump(dict(device=name, rows=rows), open(json_path, "w"), indent=1)


if __name__ == "__main__":
    from _diag_cli import main
    main(__doc__, build, run)
