"""Per-kernel durations of one unfused call from the torch profiler (GPU diagnostic)."""
import torch, megapre
from torch.profiler import profile, ProfilerActivity
for cfg in [megapre.PreambleConfig.deepseek_v3_ep8(), megapre.PreambleConfig.deepseek_v3()]:
  for m in (1, 4, 8):
    w = megapre.PreambleWeights.random(cfg, 0, "cuda")
    h = torch.randn(m, 7168, device="cuda").bfloat16(); r = torch.randn(m, 7168, device="cuda").bfloat16()
    for _ in range(3): megapre.run(h, r, w, backend="unfused")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        megapre.run(h, r, w, backend="unfused"); torch.cuda.synchronize()
    print(cfg.shared_tp_size, m, [(e.name[:24], round(e.device_time, 2)) for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA])
