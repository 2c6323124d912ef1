"""Compile-only tests of the megakernel for sm_90a (the DSL compiles without a GPU; CI runs these)."""
from __future__ import annotations

import json

import pytest

import megapre
from megapre.host import build
from megapre.host.plan import THREADS, KernelSpec

pytestmark = pytest.mark.compile
cutlass = pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl is not installed")


@pytest.mark.parametrize("shape,m,staged", [("ep8", 1, False), ("ep8", 4, False), ("tp1", 1, False),
                                            ("ep8", 1, True)])  # (ep8 M = 1: M <= 2 code paths)
def test_megakernel_compiles_with_manifest(tmp_path, shape, m, staged):
    cfg = megapre.config.SHAPE_PRESETS[shape]()
    spec = KernelSpec.from_config(cfg, m, staged=staged)
    out = build.compile_spec(spec, cache_dir=tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    cubin = (out / "megapre.cubin").read_bytes()
    assert cubin[:4] == b"\x7fELF", "not an ELF cubin"
    assert manifest["symbol"].startswith("megapre_preamble")
    assert manifest["symbol"].encode() in cubin
    assert manifest["block"] == [THREADS, 1, 1]
    assert "PDL" in manifest["launch"]
    assert manifest["arch"] == "sm_90a"
    assert len(manifest["params"]) == len(manifest["param_types"]) == len(manifest["ptx_params"]) == 26
    assert [p.split()[1] for p in manifest["ptx_params"]] == [".u64"] * 21 + [".u32"] * 5
    assert manifest["dyn_smem_bytes"] == spec.smem_bytes() <= 227 * 1024
    assert manifest["ws_layout"] == spec.ws_layout()
    # the cache is keyed by spec + arch + source hash: a second build is a no-op returning the same folder
    assert build.compile_spec(spec, cache_dir=tmp_path) == out
    assert build.load_entry(spec, cache_dir=tmp_path)[0] == cubin


@pytest.mark.parametrize("variant", ["fused-launch", "fused-empty", "fused-no-norm-hop"])
def test_whatif_variant_compiles(tmp_path, monkeypatch, variant):
    """What-if builds compile, each under its own cache key: the smallest (fused-launch: no work, no waits;
    fused-empty: the launch alone) and one that keeps all the work (fused-no-norm-hop)."""
    from megapre.host.plan import WHATIF_VARIANTS
    cfg = megapre.config.SHAPE_PRESETS["ep8"]()
    base = KernelSpec.from_config(cfg, 1)
    monkeypatch.setenv("MEGAPRE_WHATIF", ",".join(WHATIF_VARIANTS[variant]))
    spec = KernelSpec.from_config(cfg, 1)
    assert spec.whatif and spec.unsupported() is None
    out = build.compile_spec(spec, cache_dir=tmp_path)
    assert (out / "megapre.cubin").read_bytes()[:4] == b"\x7fELF"
    assert build.load_entry(base, cache_dir=tmp_path) is None  # a different key from the real kernel's


def test_staged_build_is_its_own_cubin(tmp_path):
    """run_stages' build (every stage as its own kernel) lives in a cubin of its own, under its own key: the fused
    kernel holds only the queue's path (one inlined copy of each stage, not two)."""
    cfg = megapre.config.SHAPE_PRESETS["ep8"]()
    fused_spec, staged_spec = KernelSpec.from_config(cfg, 1), KernelSpec.from_config(cfg, 1, staged=True)
    assert build.cache_key(fused_spec) != build.cache_key(staged_spec)
    fused_cubin = (build.compile_spec(fused_spec, cache_dir=tmp_path) / "megapre.cubin").read_bytes()
    staged_cubin = (build.compile_spec(staged_spec, cache_dir=tmp_path) / "megapre.cubin").read_bytes()
    assert fused_cubin != staged_cubin
    # either alone is well under the 112-KB cubin that held both paths (session 20's EP8 M = 1 build: 117792 B; the
    # fused one 90144 B with session 24's flagged hops)
    assert len(fused_cubin) < 100_000 and len(staged_cubin) < 90_000, (len(fused_cubin), len(staged_cubin))


def test_cache_key_depends_on_shape_and_sources():
    a = KernelSpec.from_config(megapre.PreambleConfig.deepseek_v3_ep8(), 4)
    b = KernelSpec.from_config(megapre.PreambleConfig.deepseek_v3_ep8(), 5)
    c = KernelSpec.from_config(megapre.PreambleConfig.deepseek_v3_ep8(ep_rank=3), 4)
    assert build.cache_key(a) != build.cache_key(b)
    assert build.cache_key(a) == build.cache_key(c), "EP rank is a launch argument, not a new kernel"
    assert build.cache_key(a, arch="sm_100a") != build.cache_key(a)
