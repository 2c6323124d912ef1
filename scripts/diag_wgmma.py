"""The FP8 tensor-core rate at N = 8 by operand source: wgmma m64n8k32 e4m3 with the weights (A) in registers, as the
megakernel issues it (QGMMA, RS), against A in swizzled shared memory (SS, as a TMA-fed GEMM would). The megakernel's
GEMM phases run ~0.45 us per 64 KB of weights per SM (~25 clocks per m64n8k32); whether the SS form is faster decides
whether a TMA -> shared memory -> wgmma design could shorten them.

Each CTA (one warpgroup; RS2: two, each issuing every round) stages a 64 x 128 weight tile and 8 x 128 tokens once, then issues `reps` rounds of 16
wgmmas -- 4 K steps on each of 4 independent accumulators -- and one wait per round; thread 0 stamps %globaltimer
around the rounds. Grid 1 (one SM) and grid 132 (every SM at once).

Build here (CuTe DSL; cubins into .diag-build/wgmma/): python scripts/diag_wgmma.py build
Run there (cupy, no DSL):                               python3 scripts/diag_wgmma.py run [--json FILE]"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", ".diag-build", "wgmma")
BM, BN, BK, NT = 64, 8, 128, 128
N_ACC = 4  # independent accumulators per round
SMEM = {"ss": BM * BK + BN * BK, "rs": BN * BK, "rs2": BN * BK}  # bytes of dynamic shared memory (1024-aligned)
THREADS = {"ss": NT, "rs": NT, "rs2": 2 * NT}  # rs2: two warpgroups, each issuing every round


def build():
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    import cutlass
    import cutlass.cute as cute
    import cutlass.utils.hopper_helpers as sm90_utils
    from cutlass import Int32, Int64, Float32, Float8E4M3FN
    from cutlass.cute.runtime import make_ptr
    from cutlass.cute.nvgpu.warpgroup import OperandSource
    from cutlass.tensor_utils import LayoutEnum
    from cutlass.memory import SmemAllocator
    sys.path.insert(0, os.path.join(HERE, ".."))
    from megapre.device import primitives as P
    from _diag_dsl import compile_cubin

    def make_mma(rs: bool):
        kw = dict(a_source=OperandSource.RMEM) if rs else {}
        return sm90_utils.make_trivial_tiled_mma(
            Float8E4M3FN, Float8E4M3FN, cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.K,
            Float32, (1, 1, 1), tiler_mn=(64, BN), **kw)

    @cute.jit
    def rounds(tiled_mma, tCrA, tCrB, reps: Int32, a_has_stage: cutlass.Constexpr):
        accs = [cute.make_rmem_tensor(tiled_mma.partition_shape_C((BM, BN)), Float32) for _ in range(N_ACC)]
        for a in accs:
            a.fill(0.0)
        tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
        for r in cutlass.range(reps, unroll=1):
            cute.nvgpu.warpgroup.fence()
            for kb in cutlass.range_constexpr(BK // 32):
                for j in cutlass.range_constexpr(N_ACC):
                    a_k = tCrA[None, None, kb, 0] if cutlass.const_expr(a_has_stage) else tCrA[None, None, kb]
                    cute.gemm(tiled_mma, accs[j], a_k, tCrB[None, None, kb, 0], accs[j])
            cute.nvgpu.warpgroup.commit_group()
            cute.nvgpu.warpgroup.wait_group(0)
        s = Float32(0.0)
        for a in accs:
            for i in cutlass.range_constexpr(cute.size(a)):
                s = s + a[i]
        return s

    @cute.jit
    def timed_rounds(tiled_mma, tCrA, tCrB, reps: Int32, a_has_stage: cutlass.Constexpr, out_ptr: Int64, tidx: Int32):
        """rounds() between two %globaltimer stamps; thread 0 stores (ns, the accumulators' sum) at out_ptr[CTA]."""
        t0 = P.globaltimer()
        s = rounds(tiled_mma, tCrA, tCrB, reps, a_has_stage)
        t1 = P.globaltimer()
        if tidx == 0:
            bid = cute.arch.block_idx()[0]
            P.st_u64(out_ptr + Int64(bid) * 16, t1 - t0)
            P.st_f32(out_ptr + Int64(bid) * 16 + 8, s)

    @cute.jit
    def stage_b(gX, sB, tidx: Int32):
        atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Float8E4M3FN, num_bits_per_copy=128)
        g2s = cute.make_tiled_copy_tv(atom, cute.make_layout((BN, BK // 16), stride=(BK // 16, 1)),
                                      cute.make_layout((1, 16)))
        if tidx < BN * BK // 16:
            t = g2s.get_slice(tidx)
            cute.copy(g2s, t.partition_S(gX), t.partition_D(sB[None, None, 0]))

    @cute.kernel
    def k_ss(w_ptr: cute.Pointer, x_ptr: cute.Pointer, out_ptr: Int64, reps: Int32):
        tidx = cute.arch.thread_idx()[0]
        tiled_mma = make_mma(False)
        sA_l = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (BM, BN, BK), Float8E4M3FN, 1)
        sB_l = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (BM, BN, BK), Float8E4M3FN, 1)
        gW = cute.make_tensor(w_ptr, cute.make_layout((BM, BK), stride=(BK, 1)))
        gX = cute.make_tensor(x_ptr, cute.make_layout((BN, BK), stride=(BK, 1)))
        alloc = SmemAllocator()
        sA = alloc.allocate_tensor(Float8E4M3FN, sA_l.outer, byte_alignment=1024, swizzle=sA_l.inner)
        sB = alloc.allocate_tensor(Float8E4M3FN, sB_l.outer, byte_alignment=1024, swizzle=sB_l.inner)
        atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Float8E4M3FN, num_bits_per_copy=128)
        g2s = cute.make_tiled_copy_tv(atom, cute.make_layout((NT // 8, 8), stride=(8, 1)), cute.make_layout((1, 16)))
        t = g2s.get_slice(tidx)
        cute.copy(g2s, t.partition_S(gW), t.partition_D(sA[None, None, 0]))
        stage_b(gX, sB, tidx)
        cute.arch.fence_view_async_shared()
        cute.arch.sync_threads()
        thr = tiled_mma.get_slice(tidx)
        tCrA = tiled_mma.make_fragment_A(thr.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(thr.partition_B(sB))
        timed_rounds(tiled_mma, tCrA, tCrB, reps, True, out_ptr, tidx)

    def rs_operands(w_ptr, x_ptr, tidx):
        """(traced inline) The RS kernels' tiled MMA and operands: the weight tile loaded into this warpgroup
        thread's A fragments (thread tidx % NT of its warpgroup), the tokens staged into shared memory for B."""
        tiled_mma = make_mma(True)
        sB_l = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (BM, BN, BK), Float8E4M3FN, 1)
        gW = cute.make_tensor(w_ptr, cute.make_layout((BM, BK), stride=(BK, 1)))
        gX = cute.make_tensor(x_ptr, cute.make_layout((BN, BK), stride=(BK, 1)))
        sB = SmemAllocator().allocate_tensor(Float8E4M3FN, sB_l.outer, byte_alignment=1024, swizzle=sB_l.inner)
        stage_b(gX, sB, tidx)
        cute.arch.fence_view_async_shared()
        cute.arch.sync_threads()
        thr = tiled_mma.get_slice(tidx % NT)
        tCgA = thr.partition_A(gW)
        tCrA = tiled_mma.make_fragment_A(tCgA)
        cute.autovec_copy(tCgA, tCrA)
        return tiled_mma, tCrA, tiled_mma.make_fragment_B(thr.partition_B(sB))

    @cute.kernel
    def k_rs(w_ptr: cute.Pointer, x_ptr: cute.Pointer, out_ptr: Int64, reps: Int32):
        tidx = cute.arch.thread_idx()[0]
        tiled_mma, tCrA, tCrB = rs_operands(w_ptr, x_ptr, tidx)
        timed_rounds(tiled_mma, tCrA, tCrB, reps, False, out_ptr, tidx)

    @cute.kernel
    def k_rs2(w_ptr: cute.Pointer, x_ptr: cute.Pointer, out_ptr: Int64, reps: Int32):
        """RS with two warpgroups per CTA (as the megakernel's 256 threads), each running all the rounds on
        accumulators of its own: whether the two share the SM's tensor cores or overlap. The stamps bracket both
        (a CTA barrier before each)."""
        tidx = cute.arch.thread_idx()[0]
        tiled_mma, tCrA, tCrB = rs_operands(w_ptr, x_ptr, tidx)
        cute.arch.sync_threads()
        t0 = P.globaltimer()
        s = rounds(tiled_mma, tCrA, tCrB, reps, False)
        cute.arch.sync_threads()
        t1 = P.globaltimer()
        if tidx == 0:
            bid = cute.arch.block_idx()[0]
            P.st_u64(out_ptr + Int64(bid) * 16, t1 - t0)
            P.st_f32(out_ptr + Int64(bid) * 16 + 8, s)

    k_ss.set_name_prefix("diag_wgmma_ss", remove_cutlass_symbol=True, keep_mangled_name=False)
    k_rs.set_name_prefix("diag_wgmma_rs", remove_cutlass_symbol=True, keep_mangled_name=False)
    k_rs2.set_name_prefix("diag_wgmma_rs2", remove_cutlass_symbol=True, keep_mangled_name=False)

    @cute.jit
    def host_ss(w: cute.Pointer, x: cute.Pointer, out: Int64, reps: Int32):
        k_ss(w, x, out, reps).launch(grid=[1, 1, 1], block=[NT, 1, 1])

    @cute.jit
    def host_rs(w: cute.Pointer, x: cute.Pointer, out: Int64, reps: Int32):
        k_rs(w, x, out, reps).launch(grid=[1, 1, 1], block=[NT, 1, 1])

    @cute.jit
    def host_rs2(w: cute.Pointer, x: cute.Pointer, out: Int64, reps: Int32):
        k_rs2(w, x, out, reps).launch(grid=[1, 1, 1], block=[2 * NT, 1, 1])

    os.makedirs(OUT_DIR, exist_ok=True)
    gm = cute.AddressSpace.gmem
    manifest = {}
    for tag, host in (("ss", host_ss), ("rs", host_rs), ("rs2", host_rs2)):
        name = compile_cubin(host, (make_ptr(Float8E4M3FN, 0, gm, assumed_align=16),
                                    make_ptr(Float8E4M3FN, 0, gm, assumed_align=16), Int64(0), Int32(1)),
                             os.path.join(OUT_DIR, f"{tag}.cubin"))
        manifest[tag] = dict(symbol=name, smem=SMEM[tag] + 2048)
    json.dump(manifest, open(os.path.join(OUT_DIR, "manifest.json"), "w"), indent=1)
    print(json.dumps(manifest, indent=1))


def run(json_path=None):
    import cupy as cp
    import numpy as np
    man = json.load(open(os.path.join(OUT_DIR, "manifest.json")))
    sms = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rng = np.random.default_rng(0)
    w = cp.asarray(rng.integers(0, 0x30, BM * BK, dtype=np.uint8))  # small e4m3 codes (no NaN / inf)
    x = cp.asarray(rng.integers(0, 0x30, BN * BK, dtype=np.uint8))
    out = cp.zeros(sms * 4, dtype=np.uint32)
    clock_mhz = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrClockRate, 0) / 1000
    rows = []
    print(f"device: {name}, {sms} SMs, max SM clock {clock_mhz:.0f} MHz")
    for tag in ("rs", "rs2", "ss"):
        if tag not in man:
            continue
        mod = cp.RawModule(path=os.path.join(OUT_DIR, f"{tag}.cubin"))
        fn = mod.get_function(man[tag]["symbol"])
        for grid in (1, sms):
            for reps in (256, 1024):
                ts = []
                for _ in range(5):
                    fn((grid,), (THREADS[tag],), (w, x, np.uint64(out.data.ptr), np.int32(reps)),
                       shared_mem=man[tag]["smem"])
                    cp.cuda.runtime.deviceSynchronize()
                    o = out.get().view(np.uint64)[0::2][:grid]
                    ts.append(float(np.median(o)))
                ns = float(np.median(ts))
                per = ns / (reps * N_ACC * (BK // 32))
                rows.append(dict(source=tag, grid=grid, reps=reps, ns=ns, ns_per_wgmma=per,
                                 clocks_per_wgmma=per * clock_mhz / 1000))
                # (rs2: per m64n8k32 of one warpgroup; the same figure as RS means the two warpgroups overlap,
                # twice it that they share the tensor cores)
                print(f"{tag.upper():3s} grid {grid:3d} reps {reps:4d}: {ns:9.0f} ns, {per:6.2f} ns per m64n8k32 "
                      f"(~{per * clock_mhz / 1000:5.1f} clocks at the max clock; 2 KB of weights each: "
                      f"{2048 / (per * clock_mhz / 1000):5.1f} B per clock)", flush=True)
    if json_path:
        json.dump(dict(device=name, rows=rows), open(json_path, "w"), indent=1)


if __name__ == "__main__":
    from _diag_cli import main
    main(__doc__, build, run)
