"""What the Triton probes (diag_icache.py, diag_mem_latency.py) share: an ordered %globaltimer read, an idle spin, and
the "weight stream" -- every program but the probe streaming 64-KB chunks of a buffer far larger than L2 from HBM,
as the megakernel's CTAs stream their weights."""
import torch
import triton
import triton.language as tl

CHUNK = 16384  # int32: 64 KB per streamer per step, 16 x 16-byte loads per thread at 8 warps
N_STREAM = 24  # steps per streamer: 131 x 24 x 64 KB = 206 MB, ~50 us at ~4 TB/s, longer than any probe

# %globaltimer, read only once `dep` is known: the read is predicated on a test of it. (An operand the asm does not
# otherwise use orders nothing: LLVM moved a chain's loads past such a read, and ptxas may move ALU work the same way.)
_TIMER_ASM = tl.constexpr("{ .reg .pred p; setp.ne.s64 p, $1, -7; mov.u64 $0, 0; @p mov.u64 $0, %globaltimer; }")


@triton.jit
def timer(dep):
    return tl.inline_asm_elementwise(_TIMER_ASM, "=l,l", [dep.to(tl.int64)], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def spin(dep, ns):
    """Idle for `ns` nanoseconds; returns the last stamp (the largest over `dep`'s elements)."""
    t_begin = tl.max(timer(dep), axis=0)
    t = t_begin
    while t - t_begin < ns:
        t = tl.max(timer(dep), axis=0)
    return t


@triton.jit
def stream(buf, sink, pid, last, n_stream, CHUNK: tl.constexpr):
    """Program pid < last: n_stream chunks of CHUNK int32 (16-byte loads), every streamer's chunks distinct and far
    apart, summed into sink[pid] so that they are not dead."""
    acc = tl.zeros([CHUNK], dtype=tl.int32)
    offs = tl.arange(0, CHUNK)
    for i in range(n_stream):
        acc += tl.load(buf + (pid + i * last).to(tl.int64) * CHUNK + offs)
    tl.store(sink + pid, tl.sum(acc, axis=0))


def stream_buffer(sms: int) -> torch.Tensor:
    """The streamers' source: N_STREAM chunks for each of sms - 1 streamers (and one spare)."""
    return torch.randint(0, 7, (CHUNK * sms * N_STREAM + CHUNK,), dtype=torch.int32, device="cuda")
