"""Read bandwidth of FP8 weight tiles by access pattern (GPU machine, Triton): each program reads one tile of
ROWS x KC bytes of a [rows, hidden] matrix -- strided (ROWS runs of KC bytes at the row stride, as the
megakernel's gate_up tasks read w13) or the same bytes contiguous (a pre-tiled layout) -- over a 235 MB buffer
(8 layers of TP1 w13) in one launch, so that HBM, not L2 or the launch, sets the time; then a copy and a
read-only torch reduction of the same buffer as references.
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
    rows, hidden = 8 * 4096, 7168
    buf = torch.randint(0, 255, (rows, hidden), dtype=torch.uint8, device="cuda")
    nbytes = buf.numel()
    out = torch.empty(nbytes // 8192, dtype=torch.int32, device="cuda")
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for name, R, K, contig in (("strided 64x1024", 64, 1024, False), ("contig 64x1024", 64, 1024, True),
                               ("strided 64x512", 64, 512, False), ("strided 128x1024", 128, 1024, False),
                               ("contig 8x8192", 8, 8192, True)):
        grid = (nbytes // (R * K),)
        for warps in (4, 8):
            def run():
                tile_sum[grid](buf, out, hidden, max(1, hidden // K), ROWS=R, KC=K, CONTIG=contig, num_warps=warps)
            run()
            torch.cuda.synchronize()
            ts = []
            for _ in range(7):
                s.record(); run(); e.record(); e.synchronize()
                ts.append(s.elapsed_time(e))
            t = sorted(ts)[len(ts) // 2] * 1e-3
            print(f"{name:17s} warps {warps}: {nbytes / t / 1e12:5.2f} TB/s", flush=True)
    y = torch.empty_like(buf)
    y.copy_(buf); torch.cuda.synchronize()
    s.record(); y.copy_(buf); e.record(); e.synchronize()
    print(f"copy: {2 * nbytes / (s.elapsed_time(e) * 1e-3) / 1e12:.2f} TB/s (read + write)")
    # a read-only reference from a library kernel: is the tiles' ~3 TB/s a property of the pattern or of reads on
    # this card? (torch's reduction reads the buffer once, contiguously, with its own vector width)
    wide = buf.view(torch.int32)
    wide.amax(); torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        s.record(); wide.amax(); e.record(); e.synchronize()
        ts.append(s.elapsed_time(e))
    print(f"torch amax (read only): {nbytes / (sorted(ts)[len(ts) // 2] * 1e-3) / 1e12:.2f} TB/s")


if __name__ == "__main__":
    main()
