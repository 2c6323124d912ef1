"""Every fused output for seeded inputs (EP8 rank 0, M = 1 / 2 / 4 / 8), with planted exact ties in the router
(whole groups equal, four equal experts in a row, all-zero inputs), saved so that two trees' outputs can be compared
bit for bit -- a change that must not move a bit (a new queue order, a rewritten route) is checked this way.

GPU machine, repository root, each tree with its own cubins:
    python3 scripts/dump_outputs.py /tmp/a.pt
    (cd .v2 && MEGAPRE_CACHE=$PWD/.megapre-cache PYTHONPATH=$PWD python3 ../scripts/dump_outputs.py /tmp/b.pt)
    python3 scripts/dump_outputs.py --compare /tmp/a.pt /tmp/b.pt
"""
import sys
import torch
import megapre
from megapre import PreambleConfig, PreambleWeights

if sys.argv[1] == "--compare":
    a, b = torch.load(sys.argv[2]), torch.load(sys.argv[3])

    def raw(t):
        return t.view(torch.uint8) if t.is_floating_point() else t
    bad = [k for k in a if not torch.equal(raw(a[k]), raw(b[k]))]
    print(f"{len(a)} tensors, {len(bad)} differ: {bad}")
    sys.exit(1 if bad else 0)

res = {}
cfg = PreambleConfig.deepseek_v3_ep8(ep_rank=0)
base = PreambleWeights.random(cfg, seed=11, device="cuda")
for m in (1, 2, 4, 8):
    for case in ("random", "group-ties", "quad-ties", "zero"):
        t = dict(base.tensors())
        g = t["gate_weight"].clone()
        b = t["e_score_correction_bias"].clone()
        e = torch.arange(cfg.n_routed_experts, device="cuda")
        if case == "group-ties":  # every group the same 32 logits and biases: group scores tie exactly
            g, b = g[e % 32], b[e % 32]
        elif case == "quad-ties":  # four equal experts in a row, inside groups
            g, b = g[e - e % 4], b[e - e % 4]
        elif case == "zero":
            b = torch.zeros_like(b)
        t["gate_weight"], t["e_score_correction_bias"] = g.contiguous(), b.contiguous()
        w = PreambleWeights(cfg, **t)
        gen = torch.Generator(device="cuda").manual_seed(100 + m)
        h = torch.randn(m, cfg.hidden_size, generator=gen, device="cuda").to(torch.bfloat16)
        r = torch.randn(m, cfg.hidden_size, generator=gen, device="cuda").to(torch.bfloat16)
        if case == "zero":
            h.zero_(); r.zero_()
        out = megapre.run(h, r, w, backend="fused")
        torch.cuda.synchronize()
        for k in ("router_logits", "topk_ids", "topk_weights", "sorted_token_ids", "expert_ids",
                  "num_tokens_post_padded", "shared_out", "a_q", "a_scale", "residual"):
            res[f"{m}/{case}/{k}"] = getattr(out, k).cpu().clone()
torch.save(res, sys.argv[1])
print("dumped", len(res), "tensors to", sys.argv[1])
