"""The entry point shared by the CuTe-DSL probes that are built here and run on the GPU machine (diag_burst.py,
diag_wgmma.py, diag_order.py, diag_stream_kind.py, diag_dsmem_hop.py, diag_cluster_start.py): `build` compiles their
cubins on this machine (the DSL cannot be installed there), `run [--json FILE]` loads and launches them there (torch
or cupy + cuda-python, no DSL); and what both halves need to agree on without the DSL (the weight stream's sizes, the
manifest's loading)."""
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# the weight stream the streaming CTAs of diag_burst / diag_order / diag_stream_kind run (_diag_dsl.weight_stream):
# 64-KB chunks of a 512-MB buffer (far larger than L2), one CTA of 256 threads per SM
STREAM_CHUNK = 65536
STREAM_CHUNKS = 8192
STREAM_THREADS = 256


def main(doc: str, build, run) -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "build":
        build()
    elif len(sys.argv) > 1 and sys.argv[1] == "run":
        run(sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--json" else None)
    else:
        print(doc)


def open_probe(out_dir: str):
    """The run-there half's start: the manifest `build` wrote into out_dir, every cubin in it loaded (torch +
    cuda-python), and the GPU. Returns (manifest, {name: LoadedKernel}, device, SM count, device name)."""
    import torch
    sys.path.insert(0, ROOT)
    from megapre.host.launch import LoadedKernel
    man = json.load(open(os.path.join(out_dir, "manifest.json")))
    dev = torch.device("cuda")
    kernels = {nm: LoadedKernel(open(os.path.join(out_dir, f"{nm}.cubin"), "rb").read(), m, dev)
               for nm, m in man.items()}
    return (man, kernels, dev, torch.cuda.get_device_properties(dev).multi_processor_count,
            torch.cuda.get_device_name(dev))



def resident_clusters(k, sms: int) -> int:
    """How many clusters of a loaded probe kernel (megapre.host.launch.LoadedKernel; CTAs where it has no cluster
    size) can be resident on the device at once."""
    if k.cluster == 1:
        return k.per_sm * sms
    from megapre.host.launch import _driver, check
    return check(_driver().cuOccupancyMaxActiveClusters(k.function, k.launch_config(sms * k.cluster)),
                 "cuOccupancyMaxActiveClusters")
