"""Read bandwidth of the shared-expert weight tiles as the megakernel reads them (GPU machine, Triton):
each program reads one 64-row x 1024-column FP8 tile of a [2 I, hidden] matrix (64 runs of 1 KB at the row
stride) or the same number of bytes contiguous (a pre-tiled layout), over 8 copies of the matrix (HBM, not L2).
Usage: python3 scripts/diag_tile_bandwidth.py"""
import torch
import triton
import triton.language as tl


@triton.jit
def tile_sum(src, out, ld, n_ksplit, ROWS: tl.constexpr, KC: tl.constexpr, CONTIG: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, KC)[None, :]
    if CONTIG:
        off = pid.to(tl.int64) * (ROWS * KC) + r * KC + c
    else:
        off = (pid // n_ksplit).to(tl.int64) * ROWS * ld + r * ld + (pid % n_ksplit) * KC + c
    x = tl.load(src + off).to(tl.int32)
    tl.store(out + pid, tl.sum(tl.sum(x, axis=1), axis=0))


def main():
    rows, hidden = 4096, 7168
    mats = [torch.randint(0, 255, (rows, hidden), dtype=torch.uint8, device="cuda") for _ in range(8)]
    out = torch.empty(rows * hidden // 65536, dtype=torch.int32, device="cuda")
    nbytes = rows * hidden
    for name, R, K, contig in (("strided 64x1024", 64, 1024, False), ("contig 64 KB", 64, 1024, True),
                               ("strided 16x4096", 16, 4096, False), ("strided 128x512", 128, 512, False),
                               ("strided 32x2048", 32, 2048, False)):
        grid = (nbytes // (R * K),)
        for warps in (4, 8):
            def run():
                for m in mats:
                    tile_sum[grid](m, out, hidden, hidden // K, ROWS=R, KC=K, CONTIG=contig, num_warps=warps)
            run()
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ts = []
            for _ in range(10):
                s.record(); run(); e.record(); e.synchronize()
                ts.append(s.elapsed_time(e) / len(mats))
            t = sorted(ts)[len(ts) // 2]
            print(f"{name:16s} warps {warps}: {t * 1e3:7.2f} us per {nbytes / 1e6:.1f} MB = {nbytes / t / 1e9:5.2f} TB/s")
    x = torch.empty(nbytes * 8, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x); torch.cuda.synchronize()
    s.record(); y.copy_(x); e.record(); e.synchronize()
    print(f"copy: {2 * x.numel() / (s.elapsed_time(e) * 1e-3) / 1e12:.2f} TB/s (read + write)")


if __name__ == "__main__":
    main()
