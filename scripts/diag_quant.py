"""Where do the fused kernel's a_q codes and shared_out part from the reference? (GPU diagnostic)"""
import os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megapre
from megapre.host import fused, reference as ref
from megapre.host.plan import KernelSpec

for shape, cfg in [("ep8", megapre.PreambleConfig.deepseek_v3_ep8(ep_rank=5)), ("tp1", megapre.PreambleConfig.deepseek_v3())]:
    w = megapre.PreambleWeights.random(cfg, 11, "cuda")
    for m in (1, 4, 8):
        g = torch.Generator(device="cuda").manual_seed(100 + m)
        h = torch.randn(m, 7168, generator=g, device="cuda").bfloat16()
        r = torch.randn(m, 7168, generator=g, device="cuda").bfloat16()
        out = megapre.PreambleOutput.empty(cfg, m, "cuda").poison()
        megapre.run(h, r, w, backend="fused", out=out)
        torch.cuda.synchronize()
        spec = KernelSpec.from_config(cfg, m)
        ws = fused.workspace_of(spec)
        lay = spec.ws_layout()
        kx = ws[lay["x"]: lay["x"] + m * 7168 * 2].view(torch.bfloat16).view(m, 7168)
        _, rx, rstd = ref.add_rmsnorm(h, r, w.norm_weight, cfg.rms_norm_eps)
        xflips = int((kx != rx).sum())
        q_from_kx, s_from_kx = ref.group_quant_fp8(kx)
        code_vs_own_x = float((q_from_kx.view(torch.uint8) != out.a_q.view(torch.uint8)).float().mean())
        scale_exact = bool(torch.equal(s_from_kx, out.a_scale))
        # shared expert recomputed (float64) from the kernel's own a_q / a_scale
        own = ref.shared_expert(out.a_q, out.a_scale, w)[0]
        rel_own = float((out.shared_out.double() - own.double()).norm() / own.double().norm())
        i = cfg.shared_local_intermediate
        kh = ws[lay["h_q"]: lay["h_q"] + m * i].view(torch.float8_e4m3fn).view(m, i)
        ks = ws[lay["h_scale"]: lay["h_scale"] + m * (i // 128) * 4].view(torch.float32).view(m, i // 128)
        _, gu, hh = ref.shared_expert(out.a_q, out.a_scale, w)
        hq_ref, hs_ref = ref.group_quant_fp8(hh)
        hflips = float((hq_ref.view(torch.uint8) != kh.view(torch.uint8)).float().mean())
        own2 = ref.block_fp8_linear(kh, ks, w.w2, w.w2_scale).to(torch.bfloat16)
        rel_down = float((out.shared_out.double() - own2.double()).norm() / own2.double().norm())
        print(f"{shape} M={m}: x flips {xflips}; a_q codes vs quant(own x) differ {code_vs_own_x:.5f}, scales exact {scale_exact}; "
              f"h_q codes vs ref-from-own-a_q differ {hflips:.4f}; shared vs ref(own a_q) rel {rel_own:.2e}; down vs ref(own h_q) rel {rel_down:.2e}", flush=True)
