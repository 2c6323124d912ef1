"""Naive, independently written formulations of the pre-amble stages, for the tests.

Everything is plain Python, one token at a time, in float64 (Python floats); torch is used only to round a
finished float64 value / row to bf16, fp32 or fp8 (the rounding points of vLLM, see reference.py).
No vectorized sort / topk is used, so a mistake in the vectorized reference cannot be copied here.
"""
from __future__ import annotations

import math

import torch

RENORM_EPS = 1e-20
FP8_MAX = 448.0
QUANT_EPS = 1e-10
NEG_INF = float("-inf")


# ---- routing ---------------------------------------------------------------------------------------------
def _sigmoid(x: float) -> float:
    # the same formula as torch.sigmoid (1 / (1 + exp(-x))); exp overflow -> 0, as in IEEE arithmetic
    try:
        return 1.0 / (1.0 + math.exp(-x))
    except OverflowError:
        return 0.0


def _better(a: float, ia: int, b: float, ib: int) -> bool:
    """Is (value a, index ia) ranked before (value b, index ib)? Larger value first, ties -> lower index."""
    if a != b:
        return a > b
    return ia < ib


def _best_indices(values: list[float], candidates: list[int], k: int) -> list[int]:
    """k best candidate indices by value (ties -> lower index), best first, by repeated selection."""
    left = list(candidates)
    chosen = []
    for _ in range(k):
        best = None
        for i in left:
            if best is None or _better(values[i], i, values[best], best):
                best = i
        chosen.append(best)
        left.remove(best)
    return chosen


def _group_score(b_group: list[float]) -> float:
    """Sum of the two largest (the maximum counted twice if it occurs twice)."""
    i1 = 0
    for i in range(1, len(b_group)):
        if b_group[i] > b_group[i1]:
            i1 = i
    i2 = None
    for i in range(len(b_group)):
        if i == i1:
            continue
        if i2 is None or b_group[i] > b_group[i2]:
            i2 = i
    score = b_group[i1] + b_group[i2]
    return NEG_INF if math.isnan(score) else score


def naive_kept_groups(logits_row, bias, n_group: int, topk_group: int) -> tuple[list[int], list[float], list[float], list[float]]:
    """(kept group indices best first, group scores, s, b) of one token."""
    e = len(logits_row)
    epg = e // n_group
    s = [_sigmoid(float(x)) for x in logits_row]
    b = []
    for i in range(e):
        v = s[i] + float(bias[i])
        b.append(NEG_INF if math.isnan(v) else v)
    scores = [_group_score(b[g * epg:(g + 1) * epg]) for g in range(n_group)]
    kept = _best_indices(scores, list(range(n_group)), topk_group)
    return kept, scores, s, b


def naive_grouped_topk_row(logits_row, bias, n_group, topk_group, top_k, fold, scaling):
    e = len(logits_row)
    epg = e // n_group
    kept, scores, s, b = naive_kept_groups(logits_row, bias, n_group, topk_group)
    if not any(math.isfinite(v) for v in scores):
        w = 1.0 / top_k
        if fold:
            w = w * scaling
        return [w] * top_k, list(range(top_k))
    candidates = sorted(g * epg + j for g in kept for j in range(epg))
    ids = _best_indices(b, candidates, top_k)
    total = 0.0
    for i in ids:
        total += s[i]
    w = [s[i] / (total + RENORM_EPS) for i in ids]
    if fold:
        w = [v * scaling for v in w]
    return w, ids


def naive_grouped_topk(logits_row_list, bias_list, n_group, topk_group, top_k, fold, scaling):
    """Per token: (weights list of lists, ids list of lists)."""
    ws, ids = [], []
    for row in logits_row_list:
        w, i = naive_grouped_topk_row(row, bias_list, n_group, topk_group, top_k, fold, scaling)
        ws.append(w)
        ids.append(i)
    return ws, ids


def naive_underfull(logits_row, bias, n_group, topk_group, top_k) -> bool:
    """True when the kept groups hold fewer than top_k experts with a finite (non-NaN) biased score and the
    row is not the all-dead fallback: then some of the top_k picks have score -inf."""
    e = len(logits_row)
    epg = e // n_group
    kept, scores, _, b = naive_kept_groups(logits_row, bias, n_group, topk_group)
    if not any(math.isfinite(v) for v in scores):
        return False
    finite = sum(1 for g in kept for j in range(epg) if b[g * epg + j] != NEG_INF)
    return finite < top_k


# ---- token sorting ---------------------------------------------------------------------------------------
def naive_max_num_tokens_padded(m, top_k, n_local, block_size):
    pairs = m * top_k
    return min(pairs * block_size, pairs + n_local * (block_size - 1))


def naive_moe_align(topk_ids, n_experts, ep_size, ep_rank, block_size):
    """(sorted_ids list, expert_ids list, num_tokens_post_padded) over the experts local to ep_rank."""
    m = len(topk_ids)
    top_k = len(topk_ids[0]) if m else 0
    n_local = n_experts // ep_size
    first = ep_rank * n_local
    sentinel = m * top_k
    per_expert = [[] for _ in range(n_local)]
    for t in range(m):
        for k in range(top_k):
            local = int(topk_ids[t][k]) - first
            if 0 <= local < n_local:
                per_expert[local].append(t * top_k + k)  # t, k ascending -> p ascending
    sorted_ids = []
    expert_ids = []
    for le in range(n_local):
        lst = per_expert[le]
        if not lst:
            continue
        n_pad = -(-len(lst) // block_size) * block_size
        sorted_ids.extend(lst + [sentinel] * (n_pad - len(lst)))
        expert_ids.extend([le] * (n_pad // block_size))
    total = len(sorted_ids)
    cap = naive_max_num_tokens_padded(m, top_k, n_local, block_size)
    cap_blocks = -(-cap // block_size)
    assert total <= cap and len(expert_ids) <= cap_blocks
    sorted_ids.extend([sentinel] * (cap - total))
    expert_ids.extend([-1] * (cap_blocks - len(expert_ids)))
    return sorted_ids, expert_ids, total


# ---- add + RMSNorm ---------------------------------------------------------------------------------------
def _bf16_row(values: list[float]) -> list[float]:
    return torch.tensor(values, dtype=torch.float64).to(torch.bfloat16).double().tolist()


def naive_add_rmsnorm(hidden, residual, weight, eps):
    """hidden, residual bf16 [M, H], weight bf16 [H] -> (res bf16, x bf16, rstd list of float64)."""
    h_rows = hidden.double().tolist()
    r_rows = residual.double().tolist()
    w = weight.double().tolist()
    res_out, x_out, rstds = [], [], []
    for hr, rr in zip(h_rows, r_rows):
        res = _bf16_row([a + b for a, b in zip(hr, rr)])
        ss = 0.0
        for v in res:
            ss += v * v
        rstd = 1.0 / math.sqrt(ss / len(res) + eps)
        y = _bf16_row([v * rstd for v in res])
        x = _bf16_row([a * b for a, b in zip(y, w)])
        res_out.append(res)
        x_out.append(x)
        rstds.append(rstd)
    to_bf16 = lambda rows: torch.tensor(rows, dtype=torch.float64).to(torch.bfloat16)  # noqa: E731
    return to_bf16(res_out), to_bf16(x_out), rstds


# ---- FP8 group quantization ------------------------------------------------------------------------------
def naive_group_quant_fp8(x, group=128):
    """Per token, per group: scale = fp32(max(amax, 1e-10) / 448), q = fp8(fp32(clamp(x / scale))) -- NaNs left out
    of the amax and a NaN quotient clamped to -448, as vLLM's fmaxf / fminf kernel does."""
    rows = x.double().tolist()
    q_rows, s_rows = [], []
    for row in rows:
        qr, sr = [], []
        for g0 in range(0, len(row), group):
            grp = row[g0:g0 + group]
            amax = max((abs(v) for v in grp if v == v), default=0.0)
            scale = torch.tensor(max(amax, QUANT_EPS) / FP8_MAX, dtype=torch.float64).float().item()
            vals = [min(max(v / scale, -FP8_MAX), FP8_MAX) if v / scale == v / scale else -FP8_MAX for v in grp]
            qr.extend(vals)
            sr.append(scale)
        q_rows.append(qr)
        s_rows.append(sr)
    q = torch.tensor(q_rows, dtype=torch.float64).float().to(torch.float8_e4m3fn)
    return q, torch.tensor(s_rows, dtype=torch.float32)
