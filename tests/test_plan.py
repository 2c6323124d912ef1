"""The megakernel's task table and workspace layout (pure Python, no GPU)."""
from __future__ import annotations

import pytest

import megapre
from megapre.host.plan import (ACT, DOWN, FIRST_WAVE_SMS, GATE_UP, N_COUNTERS, NORM, ROUTE, ROUTER, STAGE_NAMES,
                               TERMINAL_STAGES, KernelSpec, check_table, exit_free_tasks, pack_table, task_table,
                               terminal_layout, tickets_per_launch, unpack_word)

CONFIGS = [megapre.PreambleConfig.deepseek_v3_ep8(ep_rank=r) for r in (0, 7)] + [megapre.PreambleConfig.deepseek_v3()]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.short_name())
@pytest.mark.parametrize("m", range(1, 9))
def test_table_waits_only_on_earlier_tasks(cfg, m):
    spec = KernelSpec.from_config(cfg, m)
    assert spec.unsupported() is None
    rows = task_table(spec)
    check_table(rows)
    tiles = spec.stage_tiles()
    assert len(rows) == sum(tiles.values())
    for stage, n in tiles.items():
        assert sorted(r[1] for r in rows if r[0] == stage) == list(range(n)), STAGE_NAMES[stage]
    assert all(r[2] == -1 for r in rows if r[0] == NORM)
    assert all(0 <= r[4] < N_COUNTERS for r in rows)
    # the packed words the kernel decodes say the same
    assert [unpack_word(w) for w in pack_table(rows)] == [tuple(r[:4]) for r in rows]
    assert spec.n_tasks == len(rows)
    # act inside the down tasks exactly where the gate_up partials each down task reads stay small
    assert spec.fuse_act == (cfg.shared_local_intermediate * m <= 2048 and spec.small_shared)
    down_wait = {r[2] for r in rows if r[0] == DOWN}
    # (down_flags: the act inside the down tasks polls the gate_up partials themselves, no counter)
    assert down_wait == ({-1} if spec.down_flags else {GATE_UP} if spec.fuse_act else {ACT})
    assert tiles[ACT] == (0 if spec.fuse_act else cfg.shared_local_intermediate // 128)
    if spec.small_shared:  # EP8: the first wave (norm, router, route, gate_up) fits a 132-SM grid (every M) ...
        assert tiles[NORM] + tiles[ROUTER] + tiles[ROUTE] + tiles[GATE_UP] <= FIRST_WAVE_SMS == 132
        # ... with the largest tasks that fit: 7 router K splits wherever they do (with 1792-column norm tasks at
        # M = 3 / 4), 1024-column norm tasks wherever those fit beside the router
        assert (spec.router_splits == 7) == (m <= 4) and (spec.norm_groups == 8) == (m in (1, 2, 5, 6))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.short_name())
@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("sms", [132, 114, 78, 16, 4])
def test_ticket_count_per_launch(cfg, m, sms):
    """Simulate one launch's queue (any order of completion gives the same count): CTA b starts on task b, a CTA
    that took a terminal task from the queue leaves after it, every other CTA takes tickets until one is past
    the table. The count must be what the kernel assumes, and every task must be taken."""
    spec = KernelSpec.from_config(cfg, m)
    rows = task_table(spec)
    grid = spec.launch_grid(sms)
    assert 1 <= grid <= sms
    route, d0 = terminal_layout(rows)
    if spec.small_shared and sms >= d0:
        assert grid == d0  # TP8: the first wave only, so no down task is static
    n_static = spec.n_static(grid)
    if spec.small_shared and sms >= d0:
        assert rows[n_static][0] == ROUTE  # the queue's first task, for the one CTA past the static ones
    exit_free = exit_free_tasks(spec, grid) > 0
    head, taken, running = 0, set(range(n_static)), list(range(n_static))  # running: the task each CTA holds
    held_ticket = [False] * n_static + [True] * (grid - n_static)
    alive = list(range(grid))
    task_of = {b: (b if b < n_static else None) for b in alive}
    while alive:
        b = alive.pop(0)  # the CTA that finishes next (round robin: the count does not depend on the order)
        t = task_of[b]
        if t is not None and held_ticket[b] and exit_free and rows[t][0] in TERMINAL_STAGES:
            continue  # leaves without a ticket
        ticket = n_static + head
        head += 1
        held_ticket[b] = True
        if ticket < len(rows):
            taken.add(ticket)
            task_of[b] = ticket
            alive.append(b)
    assert taken == set(range(len(rows)))
    assert head == tickets_per_launch(spec, grid)


def test_check_table_catches_a_forward_wait():
    spec = KernelSpec.from_config(CONFIGS[0], 8)  # (at TP8 M <= 5 no task waits on a counter: the data flags itself)
    rows = task_table(spec)
    with pytest.raises(AssertionError, match="waits for"):
        check_table(rows[::-1])


@pytest.mark.parametrize("cfg", [0, 2])
def test_workspace_layout_is_disjoint_and_aligned(cfg):
    spec = KernelSpec.from_config(CONFIGS[cfg], 8)
    lay = spec.ws_layout()
    offs = sorted((v, k) for k, v in lay.items() if k != "total")
    assert all(v % 256 == 0 for v, _ in offs)
    inter = spec.inter
    # (x, the a_q / a_scale copies, the partials: two blocks each by launch parity where they flag themselves;
    # the fixed-point sums: always two)
    nb, rb, db = (2 if f else 1 for f in (spec.norm_flags, spec.route_flags, spec.down_flags))
    # (TP8 M = 8: only the router -> route hop flags itself; TP1: all but gate_up -> act, on its counter)
    assert (nb, rb, db) == ((1, 2, 1) if cfg == 0 else (2, 2, 1))
    sizes = {"x": nb * 8 * 7168 * 2, "aq_copy": nb * 8 * 7168, "as_copy": nb * 8 * 56 * 4,
             "router_part": rb * spec.router_splits * 8 * 256 * 4,
             "gu_part": db * spec.gu_splits * 8 * 2 * inter * 4, "h_q": 8 * inter, "h_scale": 8 * inter // 128 * 4,
             "gu_fixed": 2 * (8 * 2 * inter * 8 + 32) if spec.gu_fixed else 0, "trace": 0, "phases": 0, "period": 0}
    assert spec.gu_fixed == (cfg == 0)  # TP8 at M = 8 sums the gate_up partials in fixed point, TP1 does not
    for (a, ka), (b, _) in zip(offs, offs[1:] + [(lay["total"], "total")]):
        assert a + sizes[ka] <= b


def test_norm_flags_only_where_the_norm_writes_and_its_consumers_wait():
    """The router and gate_up tasks poll the norm's flagged data instead of its counter (no task of the table waits
    on the norm) in the fused build; the stage-by-stage build and what-if builds whose norm writes nothing or whose
    consumers do not wait keep the plain path. Every flagged word starts as the sentinel, in both parity blocks."""
    cfg = CONFIGS[0]
    spec = KernelSpec.from_config(cfg, 4)
    assert spec.norm_flags and NORM not in spec.waited_counters()
    assert all(r[2] == -1 for r in task_table(spec) if r[0] in (ROUTER, GATE_UP, DOWN, ROUTE))  # (TP8)
    assert spec.route_flags and ROUTER not in spec.waited_counters()
    assert spec.down_flags and GATE_UP not in spec.waited_counters()
    for other in (KernelSpec.from_config(cfg, 4, staged=True), KernelSpec.from_config(cfg, 4, whatif=("norm",)),
                  KernelSpec.from_config(cfg, 4, whatif=("norm_hop",))):
        assert not other.norm_flags
    assert KernelSpec.from_config(cfg, 4, whatif=("norm",)).waited_counters()[0] == NORM  # (consumers wait)
    assert all(KernelSpec.from_config(CONFIGS[2], m).norm_flags for m in range(1, 9))  # TP1: every M
    assert [KernelSpec.from_config(cfg, m).norm_flags for m in range(1, 9)] == [True] * 5 + [False] * 3
    lay = spec.ws_layout()
    spans = spec.sentinel_spans()
    assert spans[0] == (lay["x"], 2 * 4 * cfg.hidden_size * 2) and spans[1] == (lay["aq_copy"], 2 * 4 * cfg.hidden_size)
    assert all(off + n <= lay["total"] for off, n in spans)
    # without flags an area is one block (the kernel uses block 0 only): EP8 M = 8 flags only the router partials
    m8 = KernelSpec.from_config(cfg, 8)
    lay8 = m8.ws_layout()
    assert not m8.norm_flags and not m8.down_flags and m8.route_flags
    assert lay8["aq_copy"] - lay8["x"] == m8.x_block and lay8["gu_fixed"] - lay8["gu_part"] == m8.gu_block
    assert m8.sentinel_spans() == [(lay8["router_part"], 2 * m8.router_block)]


def test_fill_sentinels_sets_every_flagged_word_and_zeroes_the_fixed_point_sums():
    """fused.fill_sentinels (a new workspace, or one whose launch number was moved): both parity blocks of every
    flagged area read as plan.NORM_SENTINEL words, both blocks of the fixed-point sums as zeros, the rest untouched."""
    import torch
    from megapre.host import fused
    from megapre.host.plan import NORM_SENTINEL
    spec = KernelSpec.from_config(CONFIGS[0], 8)  # (gu_fixed at TP8 M = 8)
    lay = spec.ws_layout()
    ws = torch.full((lay["total"],), 7, dtype=torch.uint8)
    fused.fill_sentinels(spec, ws)
    covered = torch.zeros(lay["total"], dtype=torch.bool)
    for off, n in spec.sentinel_spans():
        words = ws[off: off + n].view(torch.int32)
        assert n % 4 == 0 and bool((words == NORM_SENTINEL - (1 << 32)).all())
        covered[off: off + n] = True
    gx = lay["gu_fixed"]
    assert spec.gu_fixed and bool((ws[gx: gx + 2 * spec.gu_fixed_bytes] == 0).all())
    covered[gx: gx + 2 * spec.gu_fixed_bytes] = True
    assert bool((ws[~covered] == 7).all())


def test_unsupported_shapes_say_why():
    assert "M = 9" in KernelSpec.from_config(CONFIGS[0], 9).unsupported()
    small = megapre.PreambleConfig(hidden_size=512, n_routed_experts=64, n_group=4, topk_group=2, top_k=4,
                                   shared_intermediate_size=256)
    assert KernelSpec.from_config(small, 2).unsupported() is not None


def test_kernel_arguments_follow_the_manifest_order_and_check_alignment():
    """fused._kernel_args builds the launch arguments by the parameter names the cubin's manifest lists (the
    runtime never imports the DSL), and refuses misaligned inputs with a clear error."""
    import torch
    from megapre.host import fused
    from megapre.host.plan import pack_table
    cfg = CONFIGS[0]
    w = megapre.PreambleWeights.random(cfg, seed=1)
    out = megapre.PreambleOutput.empty(cfg, 2, "cpu")
    hidden = torch.zeros(2, cfg.hidden_size, dtype=torch.bfloat16)
    residual = torch.zeros_like(hidden)
    spec = KernelSpec.from_config(cfg, 2)
    ws = torch.zeros(spec.ws_layout()["total"], dtype=torch.uint8)
    table = torch.tensor(pack_table(task_table(spec)), dtype=torch.int32)
    params = ["hidden", "residual", "norm_w", "gate_w", "bias", "w13", "w13_s", "w2", "w2_s", "o_res", "o_logits",
              "o_w", "o_ids", "o_aq", "o_as", "o_shared", "o_sorted", "o_eids", "o_ntpp", "ws", "tasks", "n_tasks",
              "first_local", "mode", "prefetch_ctas", "prefetch_delay"]
    staged = {"spec": {"staged": True}}  # mode 3 (one stage) runs on a staged cubin (fused._kernel_args checks)
    args = fused._kernel_args({"params": params, **staged}, hidden, residual, w, out, ws, table, 3, 64)
    assert args[0] == hidden.data_ptr() and args[5] == w.w13.data_ptr() and args[19] == ws.data_ptr()
    assert args[21:] == (spec.n_tasks, cfg.first_local_expert, 3, 64, 0)
    rev = fused._kernel_args({"params": params[::-1], **staged}, hidden, residual, w, out, ws, table, 3, 64)
    assert rev == args[::-1]
    with pytest.raises(RuntimeError, match="rebuild"):
        fused._kernel_args({"params": params + ["new_param"], **staged}, hidden, residual, w, out, ws, table, 3, 64)
    odd = torch.zeros(2 * cfg.hidden_size + 1, dtype=torch.bfloat16)[1:].view(2, cfg.hidden_size)
    with pytest.raises(ValueError, match="16-byte aligned"):
        fused._kernel_args({"params": params, "spec": {"staged": False}}, odd, residual, w, out, ws, table, -1, 64)


def test_whatif_specs(monkeypatch):
    """What-if builds (bench only): parts named in MEGAPRE_WHATIF, validated; "waits" empties every wait; a
    what-if spec refuses to launch outside the bench (wrong outputs), before touching any device."""
    from megapre.host import fused
    from megapre.host.plan import WHATIF_PARTS, WHATIF_VARIANTS
    cfg = CONFIGS[0]
    assert KernelSpec.from_config(cfg, 1).whatif == ()
    assert all(set(parts) <= set(WHATIF_PARTS) for parts in WHATIF_VARIANTS.values())
    monkeypatch.setenv("MEGAPRE_WHATIF", "route, norm,route")
    spec = KernelSpec.from_config(cfg, 1)
    assert spec.whatif == ("norm", "route") and spec.unsupported() is None
    assert KernelSpec.from_config(cfg, 1, whatif=("route", "norm")) == spec  # (build --whatif passes them)
    assert spec != KernelSpec.from_config(cfg, 1, trace=True)
    monkeypatch.setenv("MEGAPRE_WHATIF", "waits")
    rows = task_table(KernelSpec.from_config(cfg, 4))
    check_table(rows)
    assert all(r[2] == -1 and r[3] == 0 for r in rows)
    # "norm_hop": only the router and gate_up tasks stop waiting (for the norm) against a table where they wait for
    # its counter ("norm": the norm writes nothing, so its consumers cannot poll its data); every other row is the
    # same -- and the same as the real table's, whose consumers poll the norm's flagged data instead (norm_flags)
    monkeypatch.delenv("MEGAPRE_WHATIF")
    real = task_table(KernelSpec.from_config(cfg, 4, whatif=("norm",)))
    assert [r for r in task_table(KernelSpec.from_config(cfg, 4)) if r[0] not in (DOWN, ROUTE)] == [
        r for r in task_table(KernelSpec.from_config(cfg, 4, whatif=("norm_hop",))) if r[0] not in (DOWN, ROUTE)]
    monkeypatch.setenv("MEGAPRE_WHATIF", "norm_hop")
    rows = task_table(KernelSpec.from_config(cfg, 4))
    check_table(rows)
    assert len(rows) == len(real) and any(r[2] == NORM for r in real)
    for r, q in zip(rows, real):
        assert r[:2] == q[:2]
        assert (r[2:4] == [-1, 0]) if r[0] in (ROUTER, GATE_UP) else (r == q), (r, q)
    # "stamps" leaves nothing out: the same table, protocol and workspace, plus its period records at the end
    monkeypatch.delenv("MEGAPRE_WHATIF")
    from megapre.host.plan import PERIOD_CTAS, PERIOD_SLOTS
    for m in (1, 4, 8):
        plain, stamps = KernelSpec.from_config(cfg, m), KernelSpec.from_config(cfg, m, whatif=("stamps",))
        assert task_table(stamps) == task_table(plain) and stamps.norm_flags == plain.norm_flags
        assert (stamps.route_flags, stamps.down_flags) == (plain.route_flags, plain.down_flags)
        lay, lay_s = plain.ws_layout(), stamps.ws_layout()
        assert all(lay_s[k] == v for k, v in lay.items() if k != "total") and lay["period"] == lay["total"]
        assert lay_s["total"] >= lay_s["period"] + PERIOD_SLOTS * PERIOD_CTAS * 16
        assert stamps.launch_grid(132) <= PERIOD_CTAS
    monkeypatch.setenv("MEGAPRE_WHATIF", "everything")
    assert "MEGAPRE_WHATIF" in KernelSpec.from_config(cfg, 1).unsupported()
    monkeypatch.setenv("MEGAPRE_WHATIF", "norm")
    monkeypatch.delenv("MEGAPRE_WHATIF_BENCH", raising=False)
    import torch
    w = megapre.PreambleWeights.random(cfg, seed=1)
    h = torch.zeros(1, cfg.hidden_size, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="wrong outputs"):
        fused.run_fused(h, h.clone(), w, megapre.PreambleOutput.empty(cfg, 1, "cpu"))


def test_staged_spec():
    """run_stages' build is a spec of its own (its own cubin), and only of the plain kernel."""
    cfg = CONFIGS[0]
    fused_spec, staged_spec = KernelSpec.from_config(cfg, 2), KernelSpec.from_config(cfg, 2, staged=True)
    assert not fused_spec.staged and staged_spec.staged and fused_spec != staged_spec
    assert staged_spec.unsupported() is None
    # the same stage code; the staged build's areas are single blocks (no data flags itself between kernels)
    assert not (staged_spec.norm_flags or staged_spec.route_flags or staged_spec.down_flags)
    assert staged_spec.sentinel_spans() == [] and staged_spec.ws_layout()["total"] < fused_spec.ws_layout()["total"]
    assert "trace or what-if" in KernelSpec.from_config(cfg, 2, trace=True, staged=True).unsupported()
    assert "trace or what-if" in KernelSpec.from_config(cfg, 2, whatif=("norm",), staged=True).unsupported()


def test_build_prune_removes_only_stale_entries(tmp_path):
    """`python -m megapre build --prune`: entries built from other device sources (or unreadable) go, the current
    sources' stay -- without importing the DSL."""
    import json as _json
    from megapre.host import build
    fresh, stale, broken = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (fresh, stale, broken):
        d.mkdir()
        (d / "megapre.cubin").write_bytes(b"\x7fELF")
    (fresh / "manifest.json").write_text(_json.dumps({"source_hash": build.source_hash()}))
    (stale / "manifest.json").write_text(_json.dumps({"source_hash": "0" * 16}))
    (broken / "manifest.json").write_text("{not json")
    assert build.prune(tmp_path) == (2, 1)
    assert fresh.exists() and not stale.exists() and not broken.exists()
    assert build.prune(tmp_path / "missing") == (0, 0)
