"""megapre.run on the CPU: argument checks (raised before anything is written), backend choice, the
unfused CPU path against the reference, in-place residual, non-finite inputs."""
from __future__ import annotations

import os

import pytest
import torch

import megapre
from megapre import MAX_TOKENS, PreambleConfig, PreambleOutput, PreambleWeights, output_spec
from megapre.weights import FP8

SMALL = PreambleConfig(hidden_size=256, n_routed_experts=64, n_group=4, topk_group=2, top_k=6,
                       shared_intermediate_size=256)
OTHER = PreambleConfig(hidden_size=384, n_routed_experts=32, n_group=4, topk_group=2, top_k=4,
                       shared_intermediate_size=256)
BACKENDS = ["reference", "unfused"]
M = 4

_WEIGHTS: dict = {}


def weights_for(cfg: PreambleConfig) -> PreambleWeights:
    if cfg not in _WEIGHTS:
        _WEIGHTS[cfg] = PreambleWeights.random(cfg, seed=7)
    return _WEIGHTS[cfg]


@pytest.fixture
def seed():
    s = int(os.environ.get("MEGAPRE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={s}  (rerun with MEGAPRE_TEST_SEED={s})")
    return s


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("MEGAPRE_BACKEND", raising=False)


def make_inputs(cfg, m, seed):
    g = torch.Generator().manual_seed(seed)
    scale = 0.5 + torch.rand(m, 1, generator=g) * 4
    hidden = (torch.randn(m, cfg.hidden_size, generator=g) * scale).to(torch.bfloat16)
    residual = (torch.randn(m, cfg.hidden_size, generator=g) * scale).to(torch.bfloat16)
    return hidden, residual


def raw(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).clone() if t.numel() else t.clone()


def snapshot(out: PreambleOutput) -> dict:
    return {n: raw(t) for n, t in out.items()}


def assert_unchanged(out: PreambleOutput, snap: dict):
    for n, t in out.items():
        assert torch.equal(raw(t), snap[n]), f"out.{n} was written before the error"


def poisoned(cfg=SMALL, m=M) -> PreambleOutput:
    return PreambleOutput.empty(cfg, m).poison()


def expect_error(exc, match, hidden, residual, weights, *, backend, out=None, extra=()):
    """run() must raise ``exc`` and leave out, hidden, residual (and ``extra`` tensors) untouched."""
    tensors = [t for t in (hidden, residual, *extra) if isinstance(t, torch.Tensor)]
    before = [raw(t) for t in tensors]
    snap = snapshot(out) if isinstance(out, PreambleOutput) else None
    with pytest.raises(exc, match=match):
        megapre.run(hidden, residual, weights, backend=backend, out=out)
    if snap is not None:
        assert_unchanged(out, snap)
    for t, b in zip(tensors, before):
        assert torch.equal(raw(t), b), "an input was modified before the error"


def assert_outputs_equal(a: PreambleOutput, b: PreambleOutput, ctx=""):
    for (n, x), (_, y) in zip(a.items(), b.items()):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{n} {ctx}"
        assert torch.equal(raw(x), raw(y)), f"out.{n} differs {ctx}"


def assert_no_poison(out: PreambleOutput):
    for n, t in out.items():
        if t.dtype == torch.int32:
            assert not (t == -7777).any(), n
        elif t.dtype == FP8:
            assert not (t.view(torch.uint8) & 0x7F == 0x7F).any(), n
        else:
            assert not torch.isnan(t.float()).any(), n


# ---- bad inputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_dtype(backend, seed):
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, M, seed)
    out = poisoned()
    expect_error(TypeError, "hidden", h.float(), r, w, backend=backend, out=out)
    expect_error(TypeError, "hidden", h.half(), r, w, backend=backend, out=out)
    expect_error(TypeError, "residual", h, r.float(), w, backend=backend, out=out)
    expect_error(TypeError, "hidden", h.tolist(), r, w, backend=backend, out=out)
    expect_error(TypeError, "residual", h, None, w, backend=backend, out=out)
    expect_error(TypeError, "weights", h, r, w.tensors(), backend=backend, out=out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_shape(backend, seed):
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, M, seed)
    out = poisoned()
    expect_error(ValueError, "hidden", h[None], r, w, backend=backend, out=out)           # 3-D
    expect_error(ValueError, "hidden", h.reshape(-1), r, w, backend=backend, out=out)     # 1-D
    expect_error(ValueError, "residual", h, r[None], w, backend=backend, out=out)
    expect_error(ValueError, "residual", h, r[:, :128].contiguous(), w, backend=backend, out=out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_hidden_size(backend, seed):
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL.replace(hidden_size=384), M, seed)
    out = poisoned()
    expect_error(ValueError, "hidden.*256", h, r, w, backend=backend, out=out)
    h2, r2 = make_inputs(SMALL, M, seed)
    expect_error(ValueError, "hidden", h2[:, :128].contiguous(), r2[:, :128].contiguous(), w, backend=backend, out=out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend, seed):
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, M, seed)
    out = poisoned()
    wide = torch.zeros(M, 2 * SMALL.hidden_size, dtype=torch.bfloat16)
    wide[:, ::2] = h
    h_nc = wide[:, ::2]
    assert not h_nc.is_contiguous() and torch.equal(h_nc, h)
    expect_error(ValueError, "hidden.*contiguous", h_nc, r, w, backend=backend, out=out, extra=(wide,))
    r_t = r.t().contiguous().t()
    expect_error(ValueError, "residual.*contiguous", h, r_t, w, backend=backend, out=out)
    # a non-contiguous out field
    out2 = poisoned()
    out2.router_logits = torch.full((SMALL.n_routed_experts, M), float("nan")).t()
    expect_error(ValueError, "out.router_logits.*contiguous", h, r, w, backend=backend, out=out2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_count_bounds(backend):
    w = weights_for(SMALL)
    h0 = torch.empty(0, SMALL.hidden_size, dtype=torch.bfloat16)
    expect_error(ValueError, "M = 0", h0, h0.clone(), w, backend=backend)
    expect_error(ValueError, "M = 0", h0, h0.clone(), w, backend=backend, out=PreambleOutput.empty(SMALL, 0))
    big = torch.zeros(MAX_TOKENS + 1, SMALL.hidden_size, dtype=torch.bfloat16)
    expect_error(ValueError, f"M = {MAX_TOKENS + 1}.*{MAX_TOKENS}", big, big.clone(), w, backend=backend,
                 out=poisoned(SMALL, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_hidden_mismatch(backend, seed):
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, M + 1, seed)
    out = poisoned()
    expect_error(ValueError, "residual", h[:M].contiguous(), r, w, backend=backend, out=out)
    expect_error(ValueError, "residual", h[:M].contiguous(), r[:M - 1].contiguous(), w, backend=backend, out=out)
    # out sized for a different M
    expect_error(ValueError, "out\\.", h[:M].contiguous(), r[:M].contiguous(), w, backend=backend,
                 out=poisoned(SMALL, M + 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_of_another_config(backend, seed):
    w_other = weights_for(OTHER)
    h, r = make_inputs(SMALL, M, seed)
    out = poisoned()
    expect_error(ValueError, "hidden", h, r, w_other, backend=backend, out=out)
    # inputs that fit the weights, but an out allocated for another config (top_k, ep, block size)
    w = weights_for(SMALL)
    for other_cfg in (SMALL.replace(top_k=4), SMALL.replace(ep_size=8), SMALL.replace(moe_block_size=64),
                      OTHER):
        out = PreambleOutput.empty(other_cfg, M).poison()
        expect_error(ValueError, "out\\.", h, r, w, backend=backend, out=out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_on_another_device(backend, seed):
    w_meta = weights_for(SMALL).to("meta")
    h, r = make_inputs(SMALL, M, seed)
    expect_error(ValueError, "hidden.*device", h, r, w_meta, backend=backend)


@pytest.mark.parametrize("name", ["cuda", "Reference", "", "triton", None])
def test_bad_backend_name(name, seed):
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, M, seed)
    out = poisoned()
    expect_error(ValueError, "backend", h, r, w, backend=name, out=out)


@pytest.mark.parametrize("value", ["bogus", "REFERENCE", "auto,fused"])
def test_bad_env_backend(value, monkeypatch, seed):
    monkeypatch.setenv("MEGAPRE_BACKEND", value)
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, M, seed)
    out = poisoned()
    expect_error(ValueError, "MEGAPRE_BACKEND", h, r, w, backend="auto", out=out)


def test_env_backend_applies_to_auto_only(monkeypatch, seed):
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, M, seed)
    want = megapre.run(h, r, w, backend="reference")
    for env in (" unfused ", "reference", "auto", ""):
        monkeypatch.setenv("MEGAPRE_BACKEND", env)
        assert_outputs_equal(megapre.run(h, r, w), want, f"env={env!r}")
    monkeypatch.setenv("MEGAPRE_BACKEND", "fused")
    out = poisoned()
    expect_error((RuntimeError, ValueError), "fused", h, r, w, backend="auto", out=out)
    # an explicit backend is not overridden by the environment
    monkeypatch.setenv("MEGAPRE_BACKEND", "bogus")
    assert_outputs_equal(megapre.run(h, r, w, backend="unfused"), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_wrong_field(backend, seed):
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, M, seed)
    spec = output_spec(SMALL, M)
    for name, (dtype, shape) in spec.items():
        out = poisoned()
        bad_shape = (shape[0] + 1,) + tuple(shape[1:])
        setattr(out, name, torch.full(bad_shape, -7777 if not dtype.is_floating_point else 0).to(dtype))
        expect_error(ValueError, f"out.{name}", h, r, w, backend=backend, out=out)
    out = poisoned()
    out.topk_ids = out.topk_ids.long().fill_(-7777)
    expect_error(TypeError, "out.topk_ids", h, r, w, backend=backend, out=out)
    out = poisoned()
    out.a_q = torch.full_like(out.a_q, 0, dtype=torch.uint8).fill_(0x7F)
    expect_error(TypeError, "out.a_q", h, r, w, backend=backend, out=out)
    out = poisoned()
    out.shared_out = out.shared_out.float()
    expect_error(TypeError, "out.shared_out", h, r, w, backend=backend, out=out)
    expect_error(TypeError, "out", h, r, w, backend=backend, out=dict(out.items()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_aliasing_inputs(backend, seed):
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, M, seed)
    out = poisoned()
    out.residual = h
    expect_error(ValueError, "out.residual.*hidden", h, r, w, backend=backend, out=out)
    out = poisoned()
    out.shared_out = h
    expect_error(ValueError, "out.shared_out.*hidden", h, r, w, backend=backend, out=out)
    out = poisoned()
    out.shared_out = r
    expect_error(ValueError, "out.shared_out.*residual", h, r, w, backend=backend, out=out)
    # a field that shares hidden's storage without being the same tensor
    buf = torch.empty(2 * M * SMALL.hidden_size, dtype=torch.bfloat16)
    h_view = buf[: M * SMALL.hidden_size].view(M, SMALL.hidden_size)
    h_view.copy_(h)
    out = poisoned()
    out.router_logits = buf.view(torch.float32)[: M * SMALL.n_routed_experts].view(M, SMALL.n_routed_experts)
    expect_error(ValueError, "out.router_logits.*hidden", h_view, r, w, backend=backend, out=out, extra=(buf,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_fields_aliasing_each_other(backend, seed):
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, M, seed)
    out = poisoned()
    out.shared_out = out.residual
    expect_error(ValueError, "out", h, r, w, backend=backend, out=out)


def test_fused_on_cpu(seed):
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, M, seed)
    out = poisoned()
    expect_error((RuntimeError, ValueError), "fused", h, r, w, backend="fused", out=out)
    expect_error((RuntimeError, ValueError), "fused", h, r, w, backend="fused")
    h9, r9 = make_inputs(SMALL, megapre.FUSED_MAX_TOKENS + 1, seed)
    expect_error(ValueError, "fused|M = ", h9, r9, w, backend="fused")


class _CompiledOnCpu(Exception):
    pass


@pytest.mark.parametrize("cache", ["empty", "prebuilt"])
def test_fused_on_cpu_supported_shape(cache, monkeypatch, tmp_path):
    """A DeepSeek-V3 EP8 shape (one the fused kernel supports) on CPU: a clear error naming the fused backend,
    raised before anything is compiled, launched or written."""
    from megapre.host import build

    def no_compile(*args, **kwargs):
        raise _CompiledOnCpu("backend='fused' started compiling the megakernel for a CPU call")

    monkeypatch.setenv("MEGAPRE_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "compile_spec", no_compile, raising=False)
    if cache == "prebuilt":  # as if `python -m megapre build` had filled the cache
        monkeypatch.setattr(build, "load_entry", lambda *args, **kwargs: (b"", {}), raising=False)
    cfg = PreambleConfig.deepseek_v3_ep8()
    w = weights_for(cfg)
    h, r = make_inputs(cfg, 2, 0)
    expect_error((RuntimeError, ValueError), "fused", h, r, w, backend="fused", out=poisoned(cfg, 2))


# ---- behaviour -------------------------------------------------------------------------------------------
CONFIGS = [SMALL, SMALL.replace(ep_size=4, ep_rank=1, moe_block_size=32, fold_routed_scaling=True),
           SMALL.replace(ep_size=8, ep_rank=7, moe_block_size=64), OTHER,
           SMALL.replace(shared_intermediate_size=512, shared_tp_size=2, shared_tp_rank=1)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.short_name())
def test_unfused_equals_reference(cfg, seed):
    w = weights_for(cfg)
    tensors = {n: raw(t) for n, t in w.tensors().items()}
    for m in (1, 5, 8, 33):
        h, r = make_inputs(cfg, m, seed + m)
        h0, r0 = raw(h), raw(r)
        ref_out = megapre.run(h, r, w, backend="reference")
        out = poisoned(cfg, m)
        got = megapre.run(h, r, w, backend="unfused", out=out)
        assert got is out
        assert_no_poison(out)
        assert_outputs_equal(out, ref_out, f"seed={seed} m={m}")
        assert_outputs_equal(megapre.run(h, r, w), ref_out, "auto")
        # a reference run into a poisoned out writes every field too
        out2 = megapre.run(h, r, w, backend="reference", out=poisoned(cfg, m))
        assert_no_poison(out2)
        assert torch.equal(raw(h), h0) and torch.equal(raw(r), r0), "inputs were modified"
    for n, t in w.tensors().items():
        assert torch.equal(raw(t), tensors[n]), f"weights.{n} was modified"


def test_unfused_equals_reference_deepseek(seed):
    cfg = PreambleConfig.deepseek_v3_ep8(ep_rank=int(seed % 8))
    w = weights_for(cfg)
    h, r = make_inputs(cfg, 8, seed)
    assert_outputs_equal(megapre.run(h, r, w, backend="unfused", out=poisoned(cfg, 8)),
                         megapre.run(h, r, w, backend="reference"), f"seed={seed}")


def test_max_tokens_accepted():
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, MAX_TOKENS, 0)
    out = megapre.run(h, r, w, backend="unfused", out=poisoned(SMALL, MAX_TOKENS))
    assert_no_poison(out)
    assert out.num_tokens_post_padded.item() <= out.sorted_token_ids.numel()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_residual(backend, seed):
    w = weights_for(SMALL)
    h, r = make_inputs(SMALL, M, seed)
    want = megapre.run(h, r.clone(), w, backend="reference")
    h0 = raw(h)
    out = poisoned()
    out.residual = r
    got = megapre.run(h, r, w, backend=backend, out=out)
    assert got is out and got.residual is r
    assert torch.equal(raw(r), raw(want.residual)), "residual was not updated in place"
    assert_outputs_equal(got, want)
    assert torch.equal(raw(h), h0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_inputs(backend, seed):
    w = weights_for(SMALL)
    m = 6
    h, r = make_inputs(SMALL, m, seed)
    h[0, 5] = float("nan")
    h[1, :] = float("nan")
    r[2, 9] = float("inf")
    h[3, 0], r[3, 1] = float("inf"), float("-inf")
    h[4, 7], r[4, 7] = float("inf"), float("-inf")  # inf + -inf = nan
    h0, r0 = raw(h), raw(r)
    out = megapre.run(h, r, w, backend=backend, out=poisoned(SMALL, m))
    ids = out.topk_ids
    assert ((ids >= 0) & (ids < SMALL.n_routed_experts)).all()
    for t in range(m):
        assert len(set(ids[t].tolist())) == SMALL.top_k
    # rows whose RMSNorm is not finite fall back to experts 0..k-1 at 1/k
    for t in range(5):
        assert ids[t].tolist() == list(range(SMALL.top_k)), t
        torch.testing.assert_close(out.topk_weights[t], torch.full((SMALL.top_k,), 1 / SMALL.top_k))
    assert torch.isfinite(out.topk_weights[5]).all()
    sid = out.sorted_token_ids
    p = m * SMALL.top_k
    assert sorted(v for v in sid.tolist() if v != p) == list(range(p))
    assert int((out.expert_ids >= 0).sum()) * SMALL.moe_block_size == out.num_tokens_post_padded.item()
    assert torch.equal(raw(h), h0) and torch.equal(raw(r), r0)
    assert_outputs_equal(out, megapre.run(h, r, w, backend="reference"))


def test_public_surface():
    assert megapre.BACKENDS == ("auto", "fused", "unfused", "reference")
    assert megapre.FUSED_MAX_TOKENS == 8 and MAX_TOKENS >= megapre.FUSED_MAX_TOKENS
    out = PreambleOutput.empty(SMALL, 3)
    assert [n for n, _ in out.items()] == list(output_spec(SMALL, 3))
    out.poison()
    assert torch.isnan(out.residual.float()).all() and (out.topk_ids == -7777).all()
    assert torch.isnan(out.a_q.float()).all()


def test_out_residual_partly_overlapping_residual_is_rejected(seed):
    """In-place residual update means out.residual IS residual; a shifted view would race in the kernels."""
    w = weights_for(SMALL)
    h, _ = make_inputs(SMALL, M, seed)
    buf = torch.randn((M + 1) * SMALL.hidden_size).to(torch.bfloat16)
    r = buf[: M * SMALL.hidden_size].view(M, SMALL.hidden_size)
    out = megapre.PreambleOutput.empty(SMALL, M)
    out.residual = buf[SMALL.hidden_size:].view(M, SMALL.hidden_size)
    with pytest.raises(ValueError, match="out.residual overlaps the input residual"):
        megapre.run(h, r, w, backend="reference", out=out)


@pytest.mark.parametrize("field,value", [("ep_rank", True), ("shared_tp_rank", False), ("rms_norm_eps", "x"),
                                         ("routed_scaling_factor", None)])
def test_config_rejects_non_numbers(field, value):
    with pytest.raises(ValueError, match=field):
        PreambleConfig(**{field: value, **({"ep_size": 2} if field == "ep_rank" else {}),
                          **({"shared_tp_size": 2} if field == "shared_tp_rank" else {})})


def test_cubin_mode_guard():
    """A fused cubin runs only the queue (mode -1), a staged one only single stages (mode >= 0): launching either
    the other way is refused on the host, before any argument is read (KernelSpec.staged)."""
    from megapre.host import fused
    with pytest.raises(RuntimeError, match="mode 0 launched on a fused"):
        fused._kernel_args({"spec": {"staged": False}}, None, None, None, None, None, None, mode=0, prefetch_ctas=0)
    with pytest.raises(RuntimeError, match="mode -1 launched on a staged"):
        fused._kernel_args({"spec": {"staged": True}}, None, None, None, None, None, None, mode=-1, prefetch_ctas=0)
