"""Reliability of the fused backend on the GPU: no hang, determinism, concurrency (skipped without CUDA or
without a built kernel). The 100,000-replay run and compute-sanitizer are scripts (scripts/longrun_fused.py,
scripts/sanitize_fused.py) run by `bash scripts/gpu-check.sh reliability`."""
from __future__ import annotations

import os
import time

import pytest
import torch

import megapre
from megapre.host import fused
from megapre.host.plan import (N_COUNTERS, ROUTE, ROUTER, WS_COUNTERS, WS_HEAD, WS_TOKCTR, KernelSpec, pack_table,
                               task_table, tickets_per_launch)
from megapre.host.reference import reference

from .compare import check_output

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _setup(cfg, m, seed=0):
    ok, why = fused.can_run(cfg, m, torch.device("cuda"))
    if not ok:
        pytest.skip(f"fused backend unavailable: {why}")
    w = megapre.PreambleWeights.random(cfg, seed=int.from_bytes(os.urandom(2), "little"), device="cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(m, cfg.hidden_size, generator=g, device="cuda").to(torch.bfloat16)
    r = torch.randn(m, cfg.hidden_size, generator=g, device="cuda").to(torch.bfloat16)
    return w, h, r


def _bits(out: megapre.PreambleOutput):
    return [t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for _, t in out.items()]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_bits(a), _bits(b)))


def test_planted_never_signalled_wait_gives_up_and_the_next_call_raises():
    """A task table whose route task waits for signals that never come: the kernel must finish (bounded
    spin), record the failure, and the next megapre.run must raise naming the stage. Then calls work again."""
    cfg = megapre.PreambleConfig.deepseek_v3_ep8()
    m = 2
    w, h, r = _setup(cfg, m)
    out = megapre.PreambleOutput.empty(cfg, m, "cuda")
    megapre.run(h, r, w, backend="fused", out=out)  # warm-up: workspace, table, error record
    spec = KernelSpec.from_config(cfg, m)
    rows = task_table(spec)
    n_router = spec.stage_tiles()[ROUTER]
    for row in rows:
        if row[0] == ROUTE:  # (the counter set too: with flagged data -- TP8 M <= 5 -- the route waits on none)
            row[2], row[3] = ROUTER, n_router + 1000  # never reached
    bad = torch.tensor(pack_table(rows), dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    t0 = time.time()
    fused.run_fused(h, r, w, out, _table=bad)
    torch.cuda.synchronize()
    took = time.time() - t0
    print(f"launch with a never-signalled wait finished in {took:.2f} s")
    assert took < 60, "the bounded wait did not bound"
    with pytest.raises(megapre.MegapreKernelError, match=r"route.*router.*of \d+ signals"):
        megapre.run(h, r, w, backend="fused", out=out)
    megapre.check_fused()  # the error was reported once and cleared
    out.poison()
    megapre.run(h, r, w, backend="fused", out=out)
    check_output(out, reference(h, r, w), w)


@pytest.mark.parametrize("m", [1, 8])
def test_launch_counters_across_the_32_bit_wrap(m):
    """The workspace is never reset: launch L waits for counters >= L * tiles + target in 32-bit wrapping
    arithmetic. Start the workspace at a launch number where L * tiles crosses 2^32 and check that every call
    is still right and moves the ticket counter by exactly tickets_per_launch."""
    cfg = megapre.PreambleConfig.deepseek_v3_ep8(ep_rank=1)
    w, h, r = _setup(cfg, m, 5)
    out = megapre.PreambleOutput.empty(cfg, m, "cuda")
    megapre.run(h, r, w, backend="fused", out=out)  # workspace, table
    torch.cuda.synchronize()
    spec = KernelSpec.from_config(cfg, m)
    ws = fused.workspace_of(spec, stream=torch.cuda.current_stream())
    grid = spec.launch_grid(torch.cuda.get_device_properties(0).multi_processor_count)
    per_launch = tickets_per_launch(spec, grid)
    tiles = spec.stage_tiles()
    most = max(tiles.values())
    launch_no = (1 << 32) // most - 1  # the busiest counter wraps during the next two launches
    ws[WS_HEAD * 4: WS_HEAD * 4 + 8].view(torch.int64).fill_(launch_no * per_launch)
    fused.fill_sentinels(spec, ws)  # (the norm's flagged outputs by launch parity: a jump may land on either)

    def counter_value(per_launch_count: int) -> int:  # what a 32-bit counter holds after launch_no launches
        v = (launch_no * per_launch_count) % (1 << 32)
        return v - (1 << 32) if v >= 1 << 31 else v

    ctr = ws[WS_COUNTERS * 4: (WS_COUNTERS + N_COUNTERS) * 4].view(torch.int32)
    for c in range(N_COUNTERS):
        ctr[c] = counter_value(tiles[c])
    tok = ws[WS_TOKCTR * 4: (WS_TOKCTR + 8) * 4].view(torch.int32)  # (the norm's per-token counters: flags)
    tok.fill_(counter_value(spec.norm_tasks_per_token))
    want = reference(h, r, w)
    for _ in range(4):
        out.poison()
        megapre.run(h, r, w, backend="fused", out=out)
        torch.cuda.synchronize()
        check_output(out, want, w)
    assert int(ws[WS_HEAD * 4: WS_HEAD * 4 + 8].view(torch.int64).item()) == (launch_no + 4) * per_launch
    megapre.check_fused()


def test_1000_calls_on_the_same_inputs_are_bitwise_identical():
    cfg = megapre.PreambleConfig.deepseek_v3_ep8(ep_rank=2)
    m = 8
    w, h, r = _setup(cfg, m, 3)
    first = megapre.run(h, r, w, backend="fused")
    check_output(first, reference(h, r, w), w)
    out = megapre.PreambleOutput.empty(cfg, m, "cuda")
    differ = 0
    for i in range(1000):
        out.poison()
        megapre.run(h, r, w, backend="fused", out=out)
        if i % 10 == 9:
            differ += not _same(out, first)
    differ += not _same(out, first)
    assert differ == 0


def test_two_streams_at_once_and_graph_replays_between_eager_calls():
    cfg = megapre.PreambleConfig.deepseek_v3_ep8(ep_rank=6)
    m = 4
    w, h1, r1 = _setup(cfg, m, 11)
    _, h2, r2 = _setup(cfg, m, 12)
    want1 = megapre.run(h1, r1, w, backend="fused")
    want2 = megapre.run(h2, r2, w, backend="fused")
    check_output(want1, reference(h1, r1, w), w)
    check_output(want2, reference(h2, r2, w), w)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    o1 = megapre.PreambleOutput.empty(cfg, m, "cuda")
    o2 = megapre.PreambleOutput.empty(cfg, m, "cuda")
    bad = 0
    for _ in range(50):
        o1.poison()
        o2.poison()
        s1.wait_stream(torch.cuda.current_stream())
        s2.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s1):
            megapre.run(h1, r1, w, backend="fused", out=o1)
        with torch.cuda.stream(s2):
            megapre.run(h2, r2, w, backend="fused", out=o2)
        torch.cuda.synchronize()
        bad += (not _same(o1, want1)) + (not _same(o2, want2))
    assert bad == 0, f"{bad} wrong results with two streams"
    # a captured call replayed between eager calls on other inputs (separate workspaces per stream)
    hg, rg = h1.clone(), r1.clone()
    og = megapre.PreambleOutput.empty(cfg, m, "cuda")
    gs = torch.cuda.Stream()
    gs.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(gs):
        megapre.run(hg, rg, w, backend="fused", out=og)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=gs):
        megapre.run(hg, rg, w, backend="fused", out=og)
    oe = megapre.PreambleOutput.empty(cfg, m, "cuda")
    for i in range(100):
        src_h, src_r, want = (h1, r1, want1) if i % 2 else (h2, r2, want2)
        hg.copy_(src_h)
        rg.copy_(src_r)
        og.poison()
        graph.replay()
        oe.poison()
        other_h, other_r, other_want = (h2, r2, want2) if i % 2 else (h1, r1, want1)
        megapre.run(other_h, other_r, w, backend="fused", out=oe)
        torch.cuda.synchronize()
        bad += (not _same(og, want)) + (not _same(oe, other_want))
    assert bad == 0, f"{bad} wrong results with graph replays between eager calls"
