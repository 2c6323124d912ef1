"""What the CuTe-DSL probes built here (diag_burst.py, diag_order.py, diag_stream_kind.py, diag_dsmem_hop.py;
diag_wgmma.py for compile_cubin) share: cp.async / mbarrier / TMA bulk-copy wrappers, a use of loaded values that
keeps them all in flight, the probe CTA's timed start, the "weight stream" the other CTAs run (64-KB chunks from HBM, as the megakernel's CTAs
stream their weights), and the compile step that writes a cubin and its manifest entry for the run-there half.
Imported only by `build` (it needs the DSL)."""
import json
import os
import re
import sys
import tempfile

import cutlass
import cutlass.cute as cute
from cutlass import Int32, Int64, Uint32

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megapre.device import primitives as P  # noqa: E402
from _diag_cli import STREAM_CHUNK, STREAM_CHUNKS, STREAM_THREADS  # noqa: E402


def cp_async_16(saddr, addr):
    P._asm([], [saddr, addr], "cp.async.cg.shared.global [$0], [$1], 16;", "r,l", True)


def cp_async_commit():
    P._asm([], [], "cp.async.commit_group;", "", True)


def cp_async_wait_all():
    P._asm([], [], "cp.async.wait_all;", "", True)


def mbar_init(saddr):
    P._asm([], [saddr], "mbarrier.init.shared::cta.b64 [$0], 1;", "r", True)
    P._asm([], [], "fence.mbarrier_init.release.cluster;", "", True)


def mbar_expect(saddr, nbytes):
    P._asm([], [saddr, nbytes], "mbarrier.arrive.expect_tx.shared::cta.b64 _, [$0], $1;", "r,r", True)


def bulk_g2s(saddr, addr, nbytes, bar):
    P._asm([], [saddr, addr, nbytes, bar],
           "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1], $2, [$3];",
           "r,l,r,r", True)


def mbar_wait(saddr, parity):
    P._asm([], [saddr, parity],
           "{ .reg .pred P1; LAB_WAIT: mbarrier.try_wait.parity.shared::cta.b64 P1, [$0], $1; @P1 bra DONE; "
           "bra LAB_WAIT; DONE: }", "r,r", True)


def use_twice(vals):
    """Every loaded value used twice, an XOR first and a sum after it, so that all of them stay live and ptxas keeps
    every load in flight at once (with one XOR chain alone it reused the registers of the first few loads, ~5 loads
    in flight per thread -- the megakernel's bursts keep theirs all live for later math). Plain Python, traced
    inline: its loops unroll."""
    acc = Uint32(0)
    for v in vals:
        acc = acc ^ v[0] ^ v[1] ^ v[2] ^ v[3]
    tot = Uint32(0)
    for v in vals:
        tot = tot + v[0] + v[1] + v[2] + v[3]
    return acc ^ tot


def stream_chunk(base, threads: int, chunk: int):
    """One chunk of the weight stream (`chunk` bytes, 16-byte ld.global.nc loads by `threads` threads, as the weights
    are loaded; `base` already holds this thread's offset), all its values used."""
    return use_twice([P.ld_nc_v4(base + Int64(j * threads * 16)) for j in range(chunk // (threads * 16))])


def compile_cubin(host, args, path: str) -> str:
    """Compile `host` (a cute.jit launcher) for sm_90a with sample `args`, write its cubin to `path`, and return the
    kernel's entry symbol (what the run-there half loads)."""
    with tempfile.TemporaryDirectory() as dump:  # the DSL writes its kept artifacts there
        c = cute.compile(host, *args, options=f"--gpu-arch sm_90a --keep-ptx --keep-cubin --dump-dir {dump}")
    with open(path, "wb") as f:
        f.write(c.artifacts.CUBIN)
    return re.search(r"\.visible \.entry (\w+)\(", c.artifacts.PTX).group(1)


@cute.jit
def weight_stream(sbuf: Int64, n_stream: Int32, chunk0: Int32) -> Uint32:
    """A streaming CTA's part of the weight stream: n_stream chunks of sbuf (STREAM_CHUNKS x STREAM_CHUNK bytes), the
    i-th of CTA b being chunk (chunk0 + i * (grid - 1) + b) % STREAM_CHUNKS -- every streamer's chunks distinct, the
    grid's last CTA being the probe. Returns the XOR of what it read (the caller keeps it alive)."""
    tid = cute.arch.thread_idx()[0]
    bid = cute.arch.block_idx()[0]
    nb = cute.arch.grid_dim()[0]
    acc = Uint32(0)
    for i in cutlass.range(n_stream, unroll=1):
        c = (chunk0 + i * (nb - 1) + bid) % STREAM_CHUNKS
        acc = acc ^ stream_chunk(sbuf + Int64(c) * STREAM_CHUNK + Int64(tid * 16), STREAM_THREADS, STREAM_CHUNK)
    return acc


@cute.jit
def start_after(wait_ns: Int32) -> Int64:
    """The probe CTA's start: a barrier, wait_ns of spinning on %globaltimer while the other CTAs' stream gets going,
    another barrier, and the stamp the probe's time counts from (returned)."""
    cute.arch.sync_threads()
    t_start = P.globaltimer()
    t = t_start
    while t - t_start < Int64(wait_ns):
        t = P.globaltimer()
    cute.arch.sync_threads()
    return P.globaltimer()


def add_cubin(manifest: dict, out_dir: str, nm: str, host, args, smem_bytes: int, param_types, **meta) -> None:
    """Compile `host` into out_dir/nm.cubin (compile_cubin) and record its manifest entry for the run-there half:
    `meta` (what the variant is), its entry symbol, its dynamic shared memory (with 256 bytes to spare), one block of
    STREAM_THREADS threads and the kernel's parameter types."""
    sym = compile_cubin(host, args, os.path.join(out_dir, f"{nm}.cubin"))
    manifest[nm] = dict(**meta, symbol=sym, dyn_smem_bytes=smem_bytes + 256, block=[STREAM_THREADS, 1, 1],
                        param_types=list(param_types))
    print(f"built {nm} ({sym})", flush=True)


def write_manifest(out_dir: str, manifest: dict) -> None:
    json.dump(manifest, open(os.path.join(out_dir, "manifest.json"), "w"), indent=1)
