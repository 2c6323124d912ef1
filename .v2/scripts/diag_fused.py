"""Field-by-field diagnosis of the fused backend (and its stages run as separate kernels) against the
reference; prints every check's outcome instead of stopping at the first. Used on the GPU machine."""
import os, sys, time, traceback
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megapre
from megapre.host import fused
from megapre.host.reference import reference
from tests import compare


def checks(out, want, w):
    cfg = w.config
    res = {}
    def run(name, fn):
        try:
            fn(); res[name] = "ok"
        except AssertionError as e:
            res[name] = "FAIL " + str(e).split("\n")[0][:160]
    def residual():
        assert torch.equal(out.residual, want.residual), "residual differs"
    run("residual", residual)
    run("logits", lambda: torch.testing.assert_close(out.router_logits, want.router_logits, atol=1e-2, rtol=1e-3))
    run("routing", lambda: compare.check_routing(out, w.e_score_correction_bias, cfg))
    run("quant", lambda: compare.check_quant(out.a_q, out.a_scale, want.a_q, want.a_scale))
    def shared():
        d = (out.shared_out.double() - want.shared_out.double())
        rel = (d.norm() / want.shared_out.double().norm()).item()
        assert rel <= 2e-2, f"rel {rel:.3g}"
    run("shared", shared)
    run("sorting", lambda: compare.check_sorting(out, cfg))
    return res


for shape, cfgf in [("ep8r3", lambda: megapre.PreambleConfig.deepseek_v3_ep8(ep_rank=3)), ("tp1", megapre.PreambleConfig.deepseek_v3)]:
    cfg = cfgf()
    w = megapre.PreambleWeights.random(cfg, 3, "cuda")
    for m in (1, 4, 8):
        g = torch.Generator(device="cuda").manual_seed(m)
        h = torch.randn(m, cfg.hidden_size, generator=g, device="cuda").bfloat16()
        r = torch.randn(m, cfg.hidden_size, generator=g, device="cuda").bfloat16()
        want = reference(h, r, w)
        for mode in ("stages", "fused"):
            out = megapre.PreambleOutput.empty(cfg, m, "cuda").poison()
            try:
                if mode == "stages":
                    fused.run_stages(h, r, w, out)
                else:
                    megapre.run(h, r, w, backend="fused", out=out)
                torch.cuda.synchronize()
                print(shape, m, mode, checks(out, want, w), compare.max_errors(out, want), flush=True)
            except Exception:
                print(shape, m, mode, "EXCEPTION", traceback.format_exc()[-1500:], flush=True)
                torch.cuda.synchronize()
# repeated launches: do the launch-relative counters stay consistent?
cfg = megapre.PreambleConfig.deepseek_v3_ep8()
w = megapre.PreambleWeights.random(cfg, 5, "cuda")
h = torch.randn(4, 7168, device="cuda").bfloat16(); r = torch.randn(4, 7168, device="cuda").bfloat16()
want = reference(h, r, w)
out = megapre.PreambleOutput.empty(cfg, 4, "cuda")
t0 = time.time()
bad = 0
for i in range(200):
    out.poison()
    megapre.run(h, r, w, backend="fused", out=out)
    if i % 20 == 0:
        torch.cuda.synchronize()
        c = checks(out, want, w)
        bad += sum(v != "ok" for v in c.values())
torch.cuda.synchronize()
print("200 launches", round(time.time() - t0, 2), "s; failing checks", bad, flush=True)
