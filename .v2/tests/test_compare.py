"""The checker itself (CPU): the tie-aware routing comparison accepts a kept-group set that differs from the
float64 reference only across a near-tie of group scores, and nothing else."""
import math
from types import SimpleNamespace

import pytest
import torch

import megapre
from megapre.host import reference as ref

from .compare import check_routing


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _case(gap: float):
    """One token: groups 0-2 clearly kept; groups 3 and 4 compete for the last slot with top-two sums of
    0.9 + 0.5 and 0.7 + 0.7 + gap (different experts, equal-ish sums); the output kept group 3."""
    cfg = megapre.PreambleConfig.deepseek_v3_ep8(ep_rank=0)
    lg = torch.full((1, cfg.n_routed_experts), _logit(0.01), dtype=torch.float64)
    for g in range(3):
        lg[0, 32 * g] = lg[0, 32 * g + 1] = _logit(0.95)
    lg[0, 96], lg[0, 97] = _logit(0.9), _logit(0.5)
    lg[0, 128] = lg[0, 129] = _logit(0.7 + gap / 2)
    bias = torch.zeros(cfg.n_routed_experts)
    ids = [0, 1, 32, 33, 64, 65, 96, 97]  # the top 8 of groups {0, 1, 2, 3}
    ids = sorted(ids, key=lambda e: (-lg[0, e].item(), e))
    s = torch.sigmoid(lg[0, ids])
    out = SimpleNamespace(router_logits=lg.float(), topk_ids=torch.tensor([ids], dtype=torch.int32),
                          topk_weights=(s / (s.sum() + ref.RENORM_EPS)).float()[None])
    return out, bias, cfg


def test_a_group_near_tie_may_go_either_way():
    out, bias, cfg = _case(gap=4e-6)
    _, want = ref.grouped_topk(out.router_logits, bias, cfg)
    assert 128 in want[0].tolist()  # the reference keeps group 4 ...
    check_routing(out, bias, cfg)  # ... and group 3 is accepted


def test_a_different_group_without_a_tie_is_an_error():
    out, bias, cfg = _case(gap=0.02)
    with pytest.raises(AssertionError, match="not a tie"):
        check_routing(out, bias, cfg)
