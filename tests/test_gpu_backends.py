"""GPU correctness of the unfused and fused backends against the exact reference (skipped without CUDA).

Fresh random inputs on every run (the seed is printed), outputs poisoned before every launch, tie-aware
routing and exact sorting checks (tests/compare.py states the tolerances)."""
from __future__ import annotations

import os

import pytest
import torch

import megapre
from megapre.host import fused
from megapre.host.reference import reference

from .compare import check_output, check_routing, check_sorting, max_errors

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIGS = {
    "ep8r0": lambda: megapre.PreambleConfig.deepseek_v3_ep8(ep_rank=0),
    "ep8r5": lambda: megapre.PreambleConfig.deepseek_v3_ep8(ep_rank=5),
    "tp1": lambda: megapre.PreambleConfig.deepseek_v3(),
}
_weights_cache: dict = {}


def _weights(name):
    if name not in _weights_cache:
        _weights_cache[name] = megapre.PreambleWeights.random(CONFIGS[name](), seed=int.from_bytes(os.urandom(2), "little"),
                                                              device="cuda")
    return _weights_cache[name]


def _inputs(m, h, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = 0.5 + torch.rand(m, 1, generator=g, device="cuda") * 4  # tokens of different magnitude
    hidden = (torch.randn(m, h, generator=g, device="cuda") * scale).to(torch.bfloat16)
    residual = (torch.randn(m, h, generator=g, device="cuda") * scale).to(torch.bfloat16)
    return hidden, residual


def _skip_unless_available(backend, cfg, m):
    if backend in ("fused", "stages"):
        ok, why = fused.can_run(cfg, m, torch.device("cuda"), staged=backend == "stages")
        if not ok:
            pytest.skip(f"fused backend unavailable: {why}")


def _run(hidden, residual, w, backend, out):
    if backend == "stages":  # the megakernel's stage functions, each launched as its own kernel
        return fused.run_stages(hidden, residual, w, out)
    return megapre.run(hidden, residual, w, backend=backend, out=out)


@pytest.mark.parametrize("backend", ["unfused", "fused", "stages"])
@pytest.mark.parametrize("shape", list(CONFIGS))
@pytest.mark.parametrize("m", range(1, 9))
def test_matches_reference(backend, shape, m):
    w = _weights(shape)
    _skip_unless_available(backend, w.config, m)
    seed = int.from_bytes(os.urandom(4), "little")
    hidden, residual = _inputs(m, w.config.hidden_size, seed)
    h0, r0 = hidden.clone(), residual.clone()
    out = megapre.PreambleOutput.empty(w.config, m, "cuda").poison()
    _run(hidden, residual, w, backend, out)
    want = reference(hidden, residual, w)
    print(f"seed={seed} {backend} {shape} M={m}: {max_errors(out, want)}")
    check_output(out, want, w)
    assert torch.equal(hidden, h0) and torch.equal(residual, r0), "inputs were modified"


@pytest.mark.parametrize("backend", ["unfused", "fused"])
@pytest.mark.parametrize("shape", list(CONFIGS))
@pytest.mark.parametrize("m", [1, 3, 8])
def test_inplace_residual_in_a_graph(backend, shape, m):
    """out.residual = residual (vLLM's in-place fused_add_rms_norm): every task that reads the residual input
    must have read it before any of it is overwritten. Four layers chained in one graph, each updating the same
    residual in place (the next layer's input), against the reference applied layer by layer."""
    w = _weights(shape)
    _skip_unless_available(backend, w.config, m)
    seed = int.from_bytes(os.urandom(4), "little")
    hiddens = [_inputs(m, w.config.hidden_size, seed + i)[0] for i in range(4)]
    residual = _inputs(m, w.config.hidden_size, seed + 9)[1]
    r_start = residual.clone()
    outs = [megapre.PreambleOutput.empty(w.config, m, "cuda") for _ in hiddens]
    for o in outs:
        o.residual = residual

    def layers():
        for h, o in zip(hiddens, outs):
            megapre.run(h, residual, w, backend=backend, out=o)

    layers()  # (first calls upload the task table: outside the capture)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        layers()
    for _ in range(2):
        for o in outs:
            o.poison()  # (residual too: it is every out.residual)
        residual.copy_(r_start)
        g.replay()
        torch.cuda.synchronize()
        r = r_start.clone()
        for h in hiddens:
            want = reference(h, r, w)
            r = want.residual
        print(f"seed={seed} {backend} {shape} M={m}")
        assert torch.equal(residual, r), "in-place residual chain differs from the reference's"
        check_output(outs[-1], want, w)  # the last layer's outputs, from the in-place updated residual


@pytest.mark.parametrize("shape", list(CONFIGS))
@pytest.mark.parametrize("m", [1, 3, 8])
def test_inplace_residual_stages(shape, m):
    """The stage-by-stage debug path with out.residual = residual: its norm stage, run alone, writes the residual
    output from the norm tasks themselves, so it has to read a copy (each norm task reads its token's whole row)."""
    w = _weights(shape)
    _skip_unless_available("stages", w.config, m)
    seed = int.from_bytes(os.urandom(4), "little")
    hidden, residual = _inputs(m, w.config.hidden_size, seed)
    want = reference(hidden, residual.clone(), w)
    out = megapre.PreambleOutput.empty(w.config, m, "cuda").poison()
    out.residual = residual
    fused.run_stages(hidden, residual, w, out)
    torch.cuda.synchronize()
    print(f"seed={seed} stages {shape} M={m}")
    assert torch.equal(residual, want.residual), "in-place residual differs from the reference's"
    check_output(out, want, w)


@pytest.mark.parametrize("pdl", ["1", "0"])
@pytest.mark.parametrize("m", [1, 8])
def test_fused_with_and_without_pdl_in_a_graph_of_back_to_back_calls(monkeypatch, pdl, m):
    """Programmatic dependent launch lets each call start while the previous one drains: a graph of 8 back-to-back
    calls sharing one workspace, each on other inputs and weights, is right with PDL (default) and without."""
    monkeypatch.setenv("MEGAPRE_PDL", pdl)
    w = [_weights("ep8r0"), _weights("ep8r5")]
    _skip_unless_available("fused", w[0].config, m)
    seed = int.from_bytes(os.urandom(4), "little")
    ins = [_inputs(m, 7168, seed + i) for i in range(8)]
    outs = [megapre.PreambleOutput.empty(w[0].config, m, "cuda") for _ in ins]
    for i, (h, r) in enumerate(ins):
        megapre.run(h, r, w[i % 2], backend="fused", out=outs[i])
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i, (h, r) in enumerate(ins):
            megapre.run(h, r, w[i % 2], backend="fused", out=outs[i])
    for rnd in range(3):
        for o in outs:
            o.poison()
        g.replay()
        torch.cuda.synchronize()
        for i, (h, r) in enumerate(ins):
            check_output(outs[i], reference(h, r, w[i % 2]), w[i % 2])


@pytest.mark.parametrize("backend", ["unfused", "fused"])
def test_graph_replay_changing_inputs(backend):
    """Capture one call in a CUDA graph, then replay it on new inputs copied into the captured buffers."""
    w = _weights("ep8r0")
    m = 4
    _skip_unless_available(backend, w.config, m)
    hidden, residual = _inputs(m, w.config.hidden_size, 1)
    out = megapre.PreambleOutput.empty(w.config, m, "cuda")
    megapre.run(hidden, residual, w, backend=backend, out=out)  # warm-up (JIT / module load)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        megapre.run(hidden, residual, w, backend=backend, out=out)
    for i in range(20):
        seed = int.from_bytes(os.urandom(4), "little")
        h, r = _inputs(m, w.config.hidden_size, seed)
        hidden.copy_(h)
        residual.copy_(r)
        out.poison()
        g.replay()
        check_output(out, reference(h, r, w), w)


@pytest.mark.parametrize("backend", ["fused", "stages"])
@pytest.mark.parametrize("m", [1, 8])
def test_huge_gate_up_values(backend, m):
    """The fused kernel sums the gate_up split-K partials in fixed point, which holds |partial| < 2^28; larger
    ones (here: one 128-row block of w13 scaled by 2^32, so that its partials reach ~1e9) take the fp32
    fallback for their token, and the outputs still match the reference."""
    import dataclasses
    base = _weights("ep8r0")
    _skip_unless_available(backend, base.config, m)
    scale = base.w13_scale.clone()
    scale[1] *= 2.0 ** 32
    w = dataclasses.replace(base, w13_scale=scale)
    hidden, residual = _inputs(m, w.config.hidden_size, int.from_bytes(os.urandom(4), "little"))
    out = megapre.PreambleOutput.empty(w.config, m, "cuda").poison()
    _run(hidden, residual, w, backend, out)
    want = reference(hidden, residual, w)
    assert want.shared_out.float().abs().max() > 1e9  # the huge block reaches the output
    check_output(out, want, w)


@pytest.mark.parametrize("backend", ["unfused", "fused", "stages"])
@pytest.mark.parametrize("m", [1, 8])
def test_nan_in_an_h_group(backend, m):
    """A NaN code in one up_proj row of w13 makes one column of h NaN for every token. Its 128-group of h then
    quantizes as vLLM's kernel does it -- the scale from the group's finite values, the NaN's code -448 -- in every
    backend's act (the fused one: through the flagged fp32 partials at M = 1, the fixed-point sums' fallback at
    M = 8), so shared_out stays finite and matches the reference."""
    import dataclasses
    base = _weights("ep8r0")
    _skip_unless_available(backend, base.config, m)
    inter = base.config.shared_local_intermediate
    w13 = base.w13.clone()
    w13.view(torch.uint8)[inter + 37, 1000] = 0x7F  # e4m3 NaN: up row 37 -> h column 37 (group 0)
    w = dataclasses.replace(base, w13=w13)
    hidden, residual = _inputs(m, w.config.hidden_size, int.from_bytes(os.urandom(4), "little"))
    out = megapre.PreambleOutput.empty(w.config, m, "cuda").poison()
    _run(hidden, residual, w, backend, out)
    want = reference(hidden, residual, w)
    assert torch.isfinite(want.shared_out.float()).all()
    check_output(out, want, w)


@pytest.mark.parametrize("backend", ["unfused", "fused"])
@pytest.mark.parametrize("m", [5, 6])
def test_nan_inf_inputs(backend, m):
    """Rows with a NaN / an inf: routed to experts 0..7 (vLLM's fallback), and their quantized activations and shared
    expert output exactly as vLLM's kernels give them (the finite rows as usual)."""
    w = _weights("ep8r5")
    _skip_unless_available(backend, w.config, m)
    hidden, residual = _inputs(m, w.config.hidden_size, 7)
    hidden[1, 5] = float("nan")
    hidden[3, :] = float("inf")
    residual[4, 100] = float("-inf")
    out = megapre.PreambleOutput.empty(w.config, m, "cuda").poison()
    megapre.run(hidden, residual, w, backend=backend, out=out)
    torch.cuda.synchronize()
    ids = out.topk_ids
    assert ((ids >= 0) & (ids < w.config.n_routed_experts)).all()
    want = reference(hidden, residual, w)
    # every row here has a non-finite norm, so vLLM's fallback routes it to experts 0..7 at 1/8
    for t in (1, 3, 4):
        assert out.topk_ids[t].tolist() == want.topk_ids[t].tolist() == list(range(8))
    ok = [t for t in (0, 2, 5) if t < m]  # finite rows: tie-aware routing check against the backend's own logits
    check_routing(out, w.e_score_correction_bias, w.config, rows=ok)
    check_sorting(out, w.config)
    got, ref = out.shared_out[ok].double(), want.shared_out[ok].double()
    assert ((got - ref).norm() / ref.norm()).item() <= 6e-2
    # the non-finite rows bit for bit as vLLM's kernels give them: NaNs left out of each group's amax and clamped to
    # -448 (so a_q holds no NaN), the shared expert's output then exactly the reference's (zeros)
    for t in (1, 3, 4):
        assert torch.equal(out.a_q[t].view(torch.uint8), want.a_q[t].view(torch.uint8)), t
        assert torch.equal(out.a_scale[t], want.a_scale[t]), t
        assert torch.equal(out.shared_out[t], want.shared_out[t]), t


def _verified_cases(w, m, n):
    """n input sets with a fused result each, checked against the reference once."""
    cases = []
    for i in range(n):
        hidden, residual = _inputs(m, w.config.hidden_size, int.from_bytes(os.urandom(4), "little"))
        out = megapre.PreambleOutput.empty(w.config, m, "cuda").poison()
        megapre.run(hidden, residual, w, backend="fused", out=out)
        check_output(out, reference(hidden, residual, w), w)
        cases.append((hidden, residual, out))
    return cases


def _same(a: megapre.PreambleOutput, b: megapre.PreambleOutput) -> bool:
    return all(torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                           y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y)
               for (_, x), (_, y) in zip(a.items(), b.items()))


def test_fused_10000_back_to_back_launches():
    """Back-to-back launches on changing inputs: the launch-relative counters stay consistent, every result is right
    (bitwise equal to a result verified against the reference; the kernel is deterministic)."""
    w = _weights("ep8r5")
    m = 8
    _skip_unless_available("fused", w.config, m)
    cases = _verified_cases(w, m, 16)
    outs = [megapre.PreambleOutput.empty(w.config, m, "cuda") for _ in cases]
    bad = 0
    for rnd in range(10000 // len(cases)):
        for o in outs:
            o.poison()
        for (h, r, _), o in zip(cases, outs):
            megapre.run(h, r, w, backend="fused", out=o)
        bad += sum(not _same(o, want) for (_, _, want), o in zip(cases, outs))
    assert bad == 0, f"{bad} of 10000 launches gave a different result"


def test_fused_1000_graph_replays_changing_inputs():
    w = _weights("tp1")
    m = 3
    _skip_unless_available("fused", w.config, m)
    cases = _verified_cases(w, m, 8)
    hidden = torch.empty_like(cases[0][0])
    residual = torch.empty_like(cases[0][1])
    out = megapre.PreambleOutput.empty(w.config, m, "cuda")
    megapre.run(hidden.copy_(cases[0][0]), residual.copy_(cases[0][1]), w, backend="fused", out=out)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        megapre.run(hidden, residual, w, backend="fused", out=out)
    bad = 0
    for i in range(1000):
        h, r, want = cases[i % len(cases)]
        hidden.copy_(h)
        residual.copy_(r)
        out.poison()
        g.replay()
        bad += not _same(out, want)
    assert bad == 0, f"{bad} of 1000 replays gave a different result"
