"""The megakernel's plan for one (config, M): tile sizes, workspace layout and the task table.

Pure Python (no torch, no cutlass), shared by the build step (which bakes these numbers into the kernel as
compile-time constants) and the launcher (which allocates the workspace and uploads the task table). One
source of truth for both sides is what keeps them in agreement.

Task protocol: every task is one row [stage, tile, wait_counter, wait_target, signal_counter] of the table,
uploaded packed into one int32 per task (pack_table) that every CTA copies into shared memory before it
waits on the previous kernel. CTA b runs task b first (static: the first `n_static = KernelSpec.n_static(grid)`
tasks, so the norm tasks start without an atomic and under PDL before the previous kernel ends); later tasks
are taken in order with an atomic ticket. A task first waits until counters[wait_counter] >= wait_target
(acquire), runs its stage on its tile, then adds 1 to counters[signal_counter] (release; always the stage's
own counter). A task only waits on tasks earlier in the queue; the static ones run on lower-numbered CTAs
(dispatched first) and the dynamic ones were taken by running CTAs, so the lowest unfinished task can always
run once its CTA is resident.
Nothing is reset between launches (no host-side reset, no end-of-kernel round): the 64-bit ticket counter and
the counters only grow. Every launch takes exactly per_launch = n_tasks - n_static + grid - exit_free_tasks
tickets (tickets_per_launch: each CTA stops at its first ticket past the table, except those that leave after a
terminal task from the queue), so a CTA knows its launch number L from the ticket counter (its
first ticket, or a plain read in a static task's wait), and a wait in launch L is for
counters[c] >= L * tiles[c] + target (32-bit wrapping arithmetic). (TP8 at M <= 5 the router, gate_up and down
tasks wait on no counter: they poll the data itself, which flags itself -- KernelSpec.norm_flags.) Launches on one
workspace never overlap: stream order, and with PDL the griddepcontrol.wait before the first ticket and
before any task reads a counter or an input.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

from ..config import QUANT_GROUP, PreambleConfig

THREADS = 256
WARPS = THREADS // 32
# int64 per task in trace mode: cta, ticket taken, dependencies met, done, then the task's first three stamped points
# (megakernel.py's stamp: for a GEMM task ready, tokens staged, mma done) -- globaltimer ns, 0 where not passed --,
# then how many rounds of its poll of flagged data came back with a sentinel (megakernel.py's trace_retries)
TRACE_POINTS = 3
TRACE_RETRIES = 4 + TRACE_POINTS
TRACE_INTS = TRACE_RETRIES + 1
PHASE_SLOTS = 8  # trace mode: int64 timestamps of points inside tile 0 of each stage (see the stages' stamp calls)

# Stage ids (also the index of the counter their tasks signal), numbered in a valid dependency order.
NORM, ROUTER, GATE_UP, ROUTE, ACT, DOWN = range(6)
# Queue order: the routing chain (norm -> router -> route) is the longest serial path, so its tasks are
# taken first and never wait behind the shared expert's tasks for a free CTA.
QUEUE_ORDER = (NORM, ROUTER, ROUTE, GATE_UP, ACT, DOWN)
# TP8 shapes (every first-wave task static): the route right after the gate_up tasks, as the first task of the
# queue -- taken by the one CTA past the static ones as soon as it starts (KernelSpec.n_static), so that its CTA
# is free to leave after it without a last ticket (exit_free_tasks); its place in the chain is unchanged.
QUEUE_ORDER_TP8 = (NORM, ROUTER, GATE_UP, ROUTE, ACT, DOWN)
STAGE_NAMES = ("norm", "router", "gate_up", "route", "act", "down")
N_COUNTERS = len(STAGE_NAMES)

# Workspace control words (int32 index): the 64-bit ticket counter (indices 0-1), the error word (first failed
# task + 1), the int64 address of the host-mapped error record (set by the host), then the counters.
WS_HEAD, WS_ERROR = 0, 2
# The value of every 32-bit word of the norm's flagged outputs before the norm has written it (KernelSpec.norm_flags):
# two bf16 / four e4m3 NaNs with the sign set and every payload bit, or an fp32 NaN, none of which the norm's
# arithmetic gives (its NaNs are canonical, and it writes canonical NaNs in place of this one to be sure).
NORM_SENTINEL = 0xFFFFFFFF
WS_ERRPTR = 4  # int32 index of an 8-byte field
WS_COUNTERS = 16
# Per-token counters of the norm tasks that have read the token's row (flagged builds: the last reader writes the row's
# residual output), int32 index WS_TOKCTR + m; launch L leaves (L + 1) x (norm tasks per token) in each.
WS_TOKCTR = 24
# Host-mapped error record (int32): [failed task + 1, stage, tile, counter, seen, target, 0, 0]
ERR_INTS = 8


# What-if parts (KernelSpec.whatif): norm / route / act = that stage's work after its wait; weights = every GEMM
# weight load (the mma runs on constants) and the L2 weight prefetch; gemm = the router, gate_up and down tasks
# reduced to their wait; waits = no task waits on another; fence = a finished task signals its counter without
# the release fence (its consumers may then read stale data: timing only); empty = the launch alone: every CTA
# does griddepcontrol.launch_dependents and griddepcontrol.wait and leaves (the floor under "fused-launch");
# norm_hop = the router and gate_up tasks do not wait for the norm (they stage last call's x / a_q right after
# griddepcontrol.wait): the dependency graph a design without the norm's hop would have (its consumers normalizing
# their own K chunk), less that design's extra math.
WHATIF_PARTS = ("norm", "route", "act", "weights", "gemm", "waits", "fence", "router_w", "gu_w", "down_w", "empty",
                "norm_hop", "stamps")
# "stamps" leaves nothing out: every CTA records when its first griddepcontrol.wait returned and when it left, per
# launch (slot L % PERIOD_SLOTS of the workspace's "period" area), for scripts/period_split.py
PERIOD_SLOTS, PERIOD_CTAS = 16, 160


# The bench's what-if backends (python -m megapre bench --backends ...; built by python -m megapre build --whatif):
# each leaves out the listed parts. Together they split the per-call time into the launch and its ticket queue,
# the dependency waits, the GEMM tasks' staging and math, and the rest (docs/performance.md).
WHATIF_VARIANTS = {
    "fused-no-norm": ("norm",),
    "fused-no-route": ("route",),
    "fused-no-act": ("act",),
    "fused-no-weights": ("weights",),
    "fused-no-router-w": ("router_w",),  # one GEMM's weight traffic left out (its L2 prefetch too)
    "fused-no-gu-w": ("gu_w",),
    "fused-no-down-w": ("down_w",),
    "fused-skeleton": ("norm", "route", "act", "weights"),  # launch, tickets, waits, GEMM staging + math
    "fused-queue": ("norm", "route", "act", "weights", "gemm"),  # launch, tickets, waits
    "fused-launch": ("norm", "route", "act", "weights", "gemm", "waits"),  # launch, tickets
    "fused-empty": ("empty",),  # the launch alone: the same grid and shared memory, no prologue, no ticket
    "fused-no-norm-hop": ("norm_hop",),  # router / gate_up tasks ready at the PDL wait
    "fused-no-norm-hop-route": ("norm_hop", "route"),  # ... and no route work: the shared chain alone
    "fused-no-fence": ("fence",),  # what the release fences cost
    "fused-queue-no-fence": ("norm", "route", "act", "weights", "gemm", "fence"),
    "fused-stamps": ("stamps",),  # all the work, plus two time stamps per CTA (scripts/period_split.py)
}
# what a bench variant sets while it runs; a what-if spec refuses to launch without the second one
WHATIF_ENV, WHATIF_BENCH_ENV = "MEGAPRE_WHATIF", "MEGAPRE_WHATIF_BENCH"


def whatif_from_env() -> tuple:
    v = os.environ.get(WHATIF_ENV, "")
    return tuple(sorted({p.strip() for p in v.split(",") if p.strip()}))


# A shared expert this small per rank (DeepSeek-V3's 2048 at TP8) is a few MB: 128-row down tiles (56 tasks),
# and every CTA takes a slice of the L2 prefetch (fused._prefetch_ctas); larger ones (TP1) are tiled finer.
SMALL_SHARED_INTER = 256
# The SMs a TP8 first wave of static tasks is sized for (H100 / H200 SXM: 132). The launch's grid is the device's
# SM count; on a smaller part the last first-wave tasks come from the queue (correct, a little later).
FIRST_WAVE_SMS = 132


def _align(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class KernelSpec:
    """Everything the device code needs to know at compile time for one (config, M)."""

    m: int
    hidden: int
    experts: int
    n_group: int
    topk_group: int
    top_k: int
    inter: int  # shared-expert intermediate columns on this rank
    n_local: int
    block_size: int
    eps: float
    fold_scaling: bool
    scaling: float
    max_padded: int
    max_blocks: int
    # tiling
    # Tiles: rows per task (a multiple of 8 warps) x K splits. More rows per warp amortize the shared-memory
    # reads of the activations; the task counts keep ~1 task per SM for each GEMM at EP8 shapes.
    # A task's rows are split into 16-row blocks (one tensor-core tile each) and the 8 warps into
    # (row blocks) x (K groups); K groups are summed through shared memory in a fixed order.
    # router: 2 row blocks x 4 K groups; 8 row tiles x 7 K splits (1024 each) = 56 tasks. EP8 at M >= 5: 4 K splits
    # of 1792 (32 tasks of 114 KB, 7 chunks per warp), so that the first wave -- the norm tasks, the router, the route
    # and 56 gate_up tasks -- fits 132 SMs (a late task issues its weights only when it is taken), and the route sums
    # 4 splits of partials instead of 7. Measured on the H200 against 7 splits of 64-row tiles (c9a0a41: M = 4 / 8
    # -0.35 / -0.25 us against 56 tasks): M = 3 / 4 -0.1 us more; at M = 3 / 4 the 56 tasks of 64 KB with 1792-column
    # norm tasks (norm_groups) were later another -0.0..-0.2 (session 23), so there 7 splits are back.
    router_rows: int = 32
    router_splits: int = 7
    gu_rows: int = 64  # TP8: 4 row blocks x 2 K groups; TP1: 128 (8 row blocks, 128 KB of weights per task)
    gu_splits: int = 7  # TP8: 8 row tiles x 7 splits (1024 each) = 56 tasks, all in the first wave; TP1: 448
    down_rows: int = 64  # TP8 (K = 256): 128 rows, 56 tasks, so more CTAs finish early (PDL: the next call starts)
    # SiLU-and-mul + quantization inside every down task (no act stage, one dependency hop less), where the
    # gate_up partials each down task then reads stay small: a TP8-sized shared expert (inter x M <= 2048 at
    # every M). TP1 at M = 1 (also 2048) has 112 down tasks each reading 114 KB of partials: measured 1.7 us
    # slower than its own M = 2 with the act stage (448c4e8), so it takes the act stage too.
    fuse_act: bool = False
    # 128-groups per norm task (the task reads its token's whole row either way, for the sum of squares): 8 =
    # 1024 columns, one group per warp, 7 tasks per token. EP8 at M = 3 / 4 and M >= 7: 14 (1792 columns, 4 tasks per
    # token, one or two groups per warp), so that the first wave -- the norm, the router, the route and the gate_up
    # tasks -- fits 132 SMs (M = 8: 32 + 32 + 1 + 56 = 121 instead of 145; M = 4 with the router's 56 tasks: 16 + 56
    # + 1 + 56 = 129); with 7 tasks per token 13 gate_up
    # tasks came from the queue after the norm and issued their weights only then (session 14's traces).
    norm_groups: int = 8
    # FP8 GEMM instruction: "qgmma" = warpgroup MMA m64n8k32 on e4m3 (QGMMA in SASS; weights from registers, the
    # tokens from shared memory); "hmma" = mma.sync m16n8k16 on exact f16 codes of the e4m3 values (the
    # conversions cost issue slots). MEGAPRE_FP8_MMA selects it for builds and launches alike.
    fp8_mma: str = "qgmma"
    # in-kernel timeline: every task records (cta, ticket time, dependencies met, done) in the workspace
    trace: bool = False
    # What-if builds, for the bench only (their outputs are wrong): parts of the work taken out of the kernel, to
    # measure what the rest costs per call (MEGAPRE_WHATIF, comma-separated WHATIF_PARTS; bench.VARIANTS).
    whatif: tuple = ()
    # The stage-by-stage build (fused.run_stages: each stage launched as its own small kernel, grid = its tiles, no
    # queue; for tests and scripts/diag_fused.py) is a cubin of its own: with both paths in one kernel every stage was
    # inlined twice (EP8 M = 1: 6992 SASS instructions, the queue's path 4240), and the fused cubin alone measured
    # EP8 -0.05..-0.2 us per call (session 21, H200, three rounds; TP1 even). A staged cubin runs only mode >= 0
    # launches, a fused one only mode -1.
    staged: bool = False

    @classmethod
    def from_config(cls, cfg: PreambleConfig, m: int, trace: bool = False, whatif=None,
                    staged: bool = False) -> "KernelSpec":
        """whatif: the what-if parts to leave out (None: MEGAPRE_WHATIF's, as launches read them); staged: the
        stage-by-stage build instead of the fused one."""
        inter = cfg.shared_local_intermediate
        small = inter <= SMALL_SHARED_INTER
        gu_rows = 64 if small else 128
        # TP8: the first wave -- norm, router, route and gate_up tasks -- must fit FIRST_WAVE_SMS CTAs (a task past
        # it issues its weights only when a CTA has finished another). Where 7 router K splits with 1024-column norm
        # tasks do not fit, 7 splits with 1792-column norm tasks (M = 3 / 4), else 4 splits (M = 5 / 6), else 4
        # splits and 1792-column norm tasks (M >= 7). (H200, session 23: the M = 3 / 4 choice against 4 splits with
        # 1024-column norm tasks, three rounds: M = 3 -0.06..-0.2 us, M = 4 -0.0..-0.1.)
        groups = cfg.hidden_size // QUANT_GROUP
        router_splits, norm_groups = 7, 8

        def first_wave(splits: int, norm_groups: int) -> int:
            return (m * (groups // norm_groups) + (cfg.n_routed_experts // cls.router_rows) * splits + 1
                    + (2 * inter // gu_rows) * cls.gu_splits)

        if small:  # the first (router splits, norm groups) in this order that fits, else the smallest
            layouts = [(s, g) for s in (7, 4) for g in (8, 14) if g == 8 or groups % 14 == 0]
            router_splits, norm_groups = next((lay for lay in layouts if first_wave(*lay) <= FIRST_WAVE_SMS),
                                              layouts[-1])
        return cls(m=m, hidden=cfg.hidden_size, experts=cfg.n_routed_experts, n_group=cfg.n_group,
                   topk_group=cfg.topk_group, top_k=cfg.top_k, inter=inter,
                   n_local=cfg.n_local_experts, block_size=cfg.moe_block_size, eps=cfg.rms_norm_eps,
                   fold_scaling=cfg.fold_routed_scaling, scaling=cfg.routed_scaling_factor,
                   max_padded=cfg.max_num_tokens_padded(m), max_blocks=cfg.max_num_blocks(m),
                   down_rows=128 if small else 64, gu_rows=gu_rows, router_splits=router_splits,
                   fuse_act=inter * m <= 2048 and small, trace=trace, norm_groups=norm_groups,
                   fp8_mma=os.environ.get("MEGAPRE_FP8_MMA", "qgmma"),
                   whatif=whatif_from_env() if whatif is None else tuple(sorted(set(whatif))), staged=staged)

    # ---- what the kernel supports (checked before building or launching) --------------------------------
    def unsupported(self) -> str | None:
        """None if the megakernel handles this shape, else the reason it does not."""
        h = self.hidden
        if not 1 <= self.m <= 8:
            return f"M = {self.m} (the megakernel handles 1..8 tokens)"
        if h % (QUANT_GROUP * WARPS):
            return f"hidden_size {h} is not a multiple of {QUANT_GROUP * WARPS}"
        if self.experts != 32 * 8 or self.experts_per_group % 8:
            return f"{self.experts} experts / {self.n_group} groups (needs 256 experts, groups of 8k)"
        if self.n_local > THREADS:
            return f"{self.n_local} local experts (> {THREADS})"
        if h % (self.router_splits * QUANT_GROUP) or h % (self.gu_splits * QUANT_GROUP):
            return f"hidden_size {h} does not split into the GEMM K chunks"
        if (2 * self.inter) % self.gu_rows or h % self.down_rows or self.inter % QUANT_GROUP:
            return f"shared intermediate {self.inter} does not tile"
        if not WARPS <= self.norm_groups <= 2 * WARPS or self.hidden_groups % self.norm_groups:
            return f"{self.norm_groups} groups per norm task (8..16, dividing hidden_size / {QUANT_GROUP})"
        row_tiles = 2 * self.inter // self.gu_rows
        if self.gu_kc % (4 * row_tiles) or self.m * (self.gu_kc // row_tiles // 4) > THREADS:
            return "the gate_up tasks do not split the residual output (K chunk / row tiles columns, 4 per thread)"
        if self.staged and (self.trace or self.whatif):
            return "a stage-by-stage build with trace or what-if parts (those are fused-only)"
        if set(self.whatif) - set(WHATIF_PARTS):
            return f"MEGAPRE_WHATIF={','.join(self.whatif)!r} (parts: {', '.join(WHATIF_PARTS)})"
        if self.fp8_mma not in ("qgmma", "hmma"):
            return f"MEGAPRE_FP8_MMA={self.fp8_mma!r} (qgmma or hmma)"
        if self.fp8_mma == "qgmma" and (self.gu_rows % 64 or self.down_rows % 64 or any(
                self.chunks_per_warp(r, k) % 2 for r, k in ((self.gu_rows, self.gu_kc), (self.down_rows, self.inter)))):
            return "FP8 GEMM tiles are not whole 64-row warpgroup tiles of whole 128-K blocks per K group (qgmma)"
        if self.m * self.top_k > 64:
            return "more than 64 (token, expert) pairs"
        if self.n_tasks >= 1 << TILE_BITS:  # (every stage's tile count, and so every wait target, is below it)
            return "too many tasks for the packed task table"
        return None

    # ---- derived sizes ----------------------------------------------------------------------------------
    def launch_grid(self, num_sms: int) -> int:
        """CTAs per launch (one per SM). TP8 shapes stop at their first wave and the route -- every task before
        the down stage -- so that every down task comes from the queue: its CTA then leaves after it without a
        last ticket (exit_free_tasks), and fewer CTAs start on the SMs the previous call still holds. TP1
        (several waves of gate_up tasks) takes every SM."""
        if self.small_shared:
            return min(num_sms, terminal_tasks(self)[1])
        return num_sms

    @property
    def static_cap(self) -> int:
        """At most this many tasks are static (CTA b starts on task b): TP8 stops before the route, which is the
        queue's first task (QUEUE_ORDER_TP8), so the CTA after the static ones takes it with its first ticket."""
        if self.small_shared:
            return terminal_tasks(self)[0]
        return self.n_tasks

    def n_static(self, grid: int) -> int:
        return min(grid, self.n_tasks, self.static_cap)

    @property
    def small_shared(self) -> bool:
        """The shared expert's slice on this rank is TP8-sized (see SMALL_SHARED_INTER)."""
        return self.inter <= SMALL_SHARED_INTER

    @property
    def experts_per_group(self) -> int:
        return self.experts // self.n_group

    @property
    def hidden_groups(self) -> int:
        return self.hidden // QUANT_GROUP

    @property
    def router_kc(self) -> int:
        return self.hidden // self.router_splits

    @property
    def gu_kc(self) -> int:
        return self.hidden // self.gu_splits

    @staticmethod
    def chunks_per_warp(rows: int, kc: int) -> int:
        """64-K chunks per warp of a GEMM task: warps = (rows / 16 row blocks) x (K groups)."""
        return (kc // 64) // (WARPS // (rows // 16))

    def stage_tiles(self) -> dict[int, int]:
        return {
            NORM: self.m * (self.hidden_groups // self.norm_groups),  # (token, chunk of norm_groups 128-groups)
            ROUTER: (self.experts // self.router_rows) * self.router_splits,
            GATE_UP: (2 * self.inter // self.gu_rows) * self.gu_splits,
            ROUTE: 1,  # top-k of every token (a warp each) + token sorting
            ACT: 0 if self.fuse_act else self.inter // QUANT_GROUP,
            DOWN: self.hidden // self.down_rows,
        }

    # ---- workspace layout (bytes) -----------------------------------------------------------------------
    def ws_layout(self) -> dict[str, int]:
        off = {}
        pos = _align((WS_TOKCTR + 8) * 4)  # control words, counters, per-token counters (M <= 8)
        for name, nbytes in (
            # data that flags itself in two blocks by launch parity; without flags the kernel uses block 0 only
            *((name, (2 if flagged else 1) * block) for name, block, flagged in self.parity_areas()),
            # the gate_up partials' sums in fixed point (int64, atomics: megakernel.py's gate_up_task), then one flag
            # word per token; two blocks by launch parity: the norm tasks of launch L zero block (L + 1) % 2
            ("gu_fixed", 2 * self.gu_fixed_bytes),
            ("h_q", self.m * self.inter),  # fp8 SiLU-and-mul output
            ("h_scale", self.m * (self.inter // QUANT_GROUP) * 4),
            ("trace", (sum(self.stage_tiles().values()) * TRACE_INTS * 8) if self.trace else 0),
            ("phases", N_COUNTERS * PHASE_SLOTS * 8 if self.trace else 0),
            # (what-if "stamps") per launch slot and CTA: (first griddepcontrol.wait returned, left), int64 ns
            ("period", PERIOD_SLOTS * PERIOD_CTAS * 16 if "stamps" in self.whatif else 0),
        ):
            off[name] = pos
            pos = _align(pos + nbytes)
        off["total"] = pos
        return off

    # ---- the norm's outputs flag themselves (norm_flags) ------------------------------------------------
    @property
    def norm_flags(self) -> bool:
        """The router and gate_up tasks wait for the norm's data itself, not for its counter: every 32-bit word
        of x and of the a_q / a_scale copies starts each launch as NORM_SENTINEL (which no norm computes), so a
        consumer that has loaded its K chunk with no sentinel word in it holds this launch's values, and the
        norm's release fence and the consumer's counter round trip leave both chains. The residual output then
        comes from the norm tasks: each token's last-reading norm task writes its row (a per-token counter at
        WS_TOKCTR; in-place updates).
        Where (H200, against the counters in the same calls): TP8 at M <= 5, -0.2..-0.45 us (M = 1..5, session 24, two
        calls), and TP1 at every M, -0.15..-0.6 at M = 1 / 2 / 4 (session 25; with a wait of every norm task for all the
        others instead of the last reader it was M = 8 +1.9). Not at TP8 M >= 6 (M = 6 +0.1..+0.25, M = 7 -0.15..-0.3,
        M = 8 -0.05..+0.3: even on the whole). Off in the
        stage-by-stage build (a kernel boundary orders everything there) and in what-if builds whose norm writes
        nothing or whose consumers do not wait. Without flags the kernel uses block 0 of each area only."""
        return ((not self.small_shared or self.m <= 5) and not self.staged
                and not ({"norm", "norm_hop", "waits", "gemm"} & set(self.whatif)))

    @property
    def norm_tasks_per_token(self) -> int:
        """Norm tasks per token (norm_groups 128-groups each): what one launch adds to each per-token counter."""
        return self.hidden_groups // self.norm_groups

    @property
    def x_block(self) -> int:
        return self.m * self.hidden * 2

    @property
    def aq_block(self) -> int:
        return self.m * self.hidden

    @property
    def as_block(self) -> int:
        return (self.m * self.hidden_groups * 4 + 15) // 16 * 16

    @property
    def down_flags(self) -> bool:
        """The down tasks (TP8: the act inside them) wait for the gate_up partials themselves, as the router and
        gate_up tasks do for the norm's outputs (norm_flags): every gate_up partial word starts each launch as the
        sentinel, the gate_up tasks publish nothing, and a down task repeats its act's loads until none is."""
        # (H200, session 24, on top of norm_flags: M = 1 / 2 -0.06..-0.36 us.) Not in what-if builds without the act's
        # loads, whose down tasks would then wait for nothing.
        return self.norm_flags and self.fuse_act and "act" not in self.whatif

    @property
    def route_flags(self) -> bool:
        """The route waits for the router partials themselves (as the down tasks for the gate_up partials). Not in
        what-if builds whose route or router tasks do not load or write them."""
        # TP8 at M >= 6 too, without the norm's flags (route_flags alone: the router tasks still wait on the norm's
        # counter, and signal nothing)
        return ("route" not in self.whatif and (self.norm_flags or (
            self.small_shared and self.m >= 6 and not self.staged
            and not ({"norm", "norm_hop", "waits", "gemm"} & set(self.whatif)))))

    @property
    def router_block(self) -> int:
        return self.router_splits * self.m * self.experts * 4

    @property
    def gu_block(self) -> int:
        return self.gu_splits * self.m * 2 * self.inter * 4

    def parity_areas(self) -> tuple:
        """(workspace area, bytes of one block, whether its data flags itself) for the areas that hold two blocks by
        launch parity where their data flags itself (launch L writes block L % 2 and refills block (L + 1) % 2 with
        the sentinel), one block otherwise: the norm's outputs as its consumers read them (norm_flags) -- x, the bf16
        normalized input of the router GEMM, and copies of a_q / a_scale (the outputs themselves are the caller's) --
        and the fp32 split-K partials of the router (route_flags) and of gate_up (down_flags)."""
        return (("x", self.x_block, self.norm_flags), ("aq_copy", self.aq_block, self.norm_flags),
                ("as_copy", self.as_block, self.norm_flags), ("router_part", self.router_block, self.route_flags),
                ("gu_part", self.gu_block, self.down_flags))

    def sentinel_spans(self) -> list[tuple[int, int]]:
        """(byte offset, bytes) of the workspace that starts as NORM_SENTINEL words (0xff bytes): both blocks of
        each area of data that flags itself (parity_areas)."""
        lay = self.ws_layout()
        return [(lay[name], 2 * block) for name, block, flagged in self.parity_areas() if flagged]

    @property
    def gu_fixed(self) -> bool:
        """The gate_up partials also meet in fixed-point sums (megakernel.py's gate_up_task), which the act reads
        instead of the fp32 partials: TP8 with the act inside the down tasks at M = 8, where each of the 56 down
        tasks would read 114 KB of partials at once. Measured (session 17, H200, against fp32 partials, in one
        call each): M = 8 -0.24 / -0.25 / -0.25 us (three calls), M = 7 +0.3, M = 6 even, M = 5 +0.4, M = 1 / 4
        +0.1, TP1 +0.5..+1.1 (where the zeroing and the atomics cost more than the smaller reads save); again in
        session 18 with the act's math on the FMA pipe: M = 5 / 6 / 7 +0.25 / +0.2 / +0.1."""
        return self.small_shared and self.fuse_act and self.m >= 8

    @property
    def gu_fixed_flags_at(self) -> int:
        """Byte offset of the per-token fallback flags in the "gu_fixed" area: right after the sums ([M, 2 I] int64),
        so that the norm tasks zero sums and flags as one span."""
        return self.m * 2 * self.inter * 8

    @property
    def gu_fixed_bytes(self) -> int:
        """The gate_up sums in fixed point ([M, 2 I] int64) and the per-token fallback flags after them."""
        if not self.gu_fixed:
            return 0
        return self.gu_fixed_flags_at + (self.m * 4 + 15) // 16 * 16

    @property
    def max_kc(self) -> int:
        return max(self.router_kc, self.gu_kc, self.inter)

    def smem_layout(self) -> dict[str, int]:
        """Byte offsets in the GEMM staging buffer: activations of 8 token rows as 16-bit values (rows past M
        are zero), their FP8 group scales, and the cross-warp reduction buffer."""
        act = 8 * self.max_kc * 2
        ascale = 8 * (self.max_kc // QUANT_GROUP) * 4
        red = 4 * 32 * 8 * 4  # max over GEMMs of (K groups) x (rows) x 8 tokens x fp32
        return {"act": 0, "ascale": act, "red": act + ascale, "total": act + ascale + red}

    def smem_floats(self) -> int:
        return self.smem_layout()["total"] // 4

    SMEM_INTS = 1280  # task slot, reduction scratch, token-sorting arrays

    @property
    def n_tasks(self) -> int:
        return sum(self.stage_tiles().values())

    def smem_bytes(self) -> int:
        # GEMM staging, int scratch, the packed task table (+ alignment slack)
        return self.smem_floats() * 4 + self.SMEM_INTS * 4 + _align(self.n_tasks * 4, 16) + 256

    def waited_counters(self) -> tuple[int, ...]:
        """The counters some task of this spec's table waits on (their stages must signal)."""
        return tuple(sorted({r[2] for r in task_table(self) if r[2] >= 0}))

    def key_fields(self) -> dict:
        return dataclasses.asdict(self)


def task_table(spec: KernelSpec) -> list[list[int]]:
    """The queue: stages in dependency order, each task waiting on the counter of the stage it reads."""
    tiles = spec.stage_tiles()
    waits = {  # stage -> (counter it waits on, how many signals make it ready)
        NORM: (-1, 0),
        ROUTER: (NORM, tiles[NORM]),
        GATE_UP: (NORM, tiles[NORM]),
        ROUTE: (ROUTER, tiles[ROUTER]),
        ACT: (GATE_UP, tiles[GATE_UP]),
        DOWN: (GATE_UP, tiles[GATE_UP]) if spec.fuse_act else (ACT, tiles[ACT]),
    }
    rows = []
    for stage in (QUEUE_ORDER_TP8 if spec.small_shared else QUEUE_ORDER):
        ctr, target = (-1, 0) if "waits" in spec.whatif else waits[stage]
        if (spec.norm_flags or "norm_hop" in spec.whatif) and stage in (ROUTER, GATE_UP):
            ctr, target = -1, 0
        if (spec.down_flags and stage == DOWN) or (spec.route_flags and stage == ROUTE):
            ctr, target = -1, 0
        for tile in range(tiles[stage]):
            rows.append([stage, tile, ctr, target, stage])
    return rows


# Packed task word: stage | (wait_counter + 1) << 3 | tile << 6 | wait_target << 18 (signal = the stage's counter)
TILE_BITS = 12
TARGET_BITS = 13


def pack_table(rows: list[list[int]]) -> list[int]:
    words = []
    for stage, tile, ctr, target, sig, *_ in rows:
        assert sig == stage and 0 <= stage < 8 and -1 <= ctr < 7, (stage, ctr, sig)
        assert 0 <= tile < 1 << TILE_BITS and 0 <= target < 1 << TARGET_BITS, (tile, target)
        words.append(stage | (ctr + 1) << 3 | tile << 6 | target << 18)
    return words


# Terminal stages: their outputs leave the kernel and no task waits on them. A CTA that was given a task of one
# of these from the queue (not as its static first task) leaves after it without taking another ticket.
TERMINAL_STAGES = (ROUTE, DOWN)


def terminal_layout(rows: list[list[int]]) -> tuple[int, int]:
    """(index of the route task, index of the first down task): the table's terminal tasks are that one route
    task and the down tasks at its end (what the kernel's ticket arithmetic assumes)."""
    stages = [r[0] for r in rows]
    route = [i for i, s in enumerate(stages) if s == ROUTE]
    d0 = stages.index(DOWN)
    assert len(route) == 1 and all(s == DOWN for s in stages[d0:]) and DOWN not in stages[:d0], stages
    return route[0], d0


@functools.lru_cache(maxsize=None)
def terminal_tasks(spec: KernelSpec) -> tuple[int, int]:
    """terminal_layout of the spec's table, built once per spec (launch_grid runs on every launch: rebuilding the
    table there cost ~50 us of host time per eager call)."""
    return terminal_layout(task_table(spec))


def exit_free_tasks(spec: KernelSpec, grid: int) -> int:
    """How many CTAs of a launch leave without a ticket past the table: one per terminal task taken from the
    queue (each such CTA leaves after it). Zero -- every CTA takes its last ticket -- where they would be the
    whole grid: then some CTA must be left to take the remaining tasks."""
    route, d0 = terminal_tasks(spec)
    n_static = spec.n_static(grid)
    n = (spec.n_tasks - max(n_static, d0)) + (1 if route >= n_static else 0)
    return n if n < grid else 0


def tickets_per_launch(spec: KernelSpec, grid: int) -> int:
    """How far one launch moves the ticket counter: the tasks after the static ones, plus one past the table
    per CTA that does not leave after a terminal task from the queue (exit_free_tasks)."""
    return spec.n_tasks - spec.n_static(grid) + grid - exit_free_tasks(spec, grid)


def unpack_word(w: int) -> tuple[int, int, int, int]:
    """(stage, tile, wait_counter, wait_target): what the kernel decodes."""
    return w & 7, (w >> 6) & ((1 << TILE_BITS) - 1), ((w >> 3) & 7) - 1, (w >> 18) & ((1 << TARGET_BITS) - 1)


def check_table(rows: list[list[int]]) -> None:
    """The deadlock-freedom invariant: every wait is on a counter whose signals all come earlier."""
    signalled = [0] * N_COUNTERS
    for i, (stage, _tile, ctr, target, sig, *_rest) in enumerate(rows):
        if ctr >= 0 and signalled[ctr] < target:
            raise AssertionError(f"task {i} ({STAGE_NAMES[stage]}) waits for {target} signals of "
                                 f"{STAGE_NAMES[ctr]} but only {signalled[ctr]} come before it")
        signalled[sig] += 1
