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


class ClusterKernel:
    """A probe cubin loaded into torch's context (cuda-python) and launched with its manifest's cluster size as the
    cluster-dimension attribute (none at size 1; sizes above 8 need the non-portable attribute), optionally with the
    programmatic-dependent-launch attribute -- megapre's LoadedKernel has neither clusters nor that choice. Every
    driver return code is checked."""

    def __init__(self, path: str, meta: dict, device):
        import torch
        sys.path.insert(0, ROOT)
        from megapre.host.launch import _CTYPES, _driver, check
        self.drv, self.check, self.meta = _driver(), check, meta
        self.cluster = int(meta.get("cluster", 1))
        attrs = self.drv.CUfunction_attribute
        with torch.cuda.device(device):
            torch.empty(1, device=device)  # torch's primary context current
            self.module = check(self.drv.cuModuleLoadData(open(path, "rb").read()), "cuModuleLoadData")
            self.function = check(self.drv.cuModuleGetFunction(self.module, meta["symbol"].encode()),
                                  "cuModuleGetFunction")
            check(self.drv.cuFuncSetAttribute(self.function, attrs.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                              meta["dyn_smem_bytes"]), "cuFuncSetAttribute(max dynamic smem)")
            if self.cluster > 8:
                check(self.drv.cuFuncSetAttribute(self.function,
                                                  attrs.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1),
                      "cuFuncSetAttribute(non-portable cluster size)")
        self.types = tuple(_CTYPES[t] for t in meta["param_types"])

    def config(self, grid: int, pdl: bool = False):
        import torch
        cfg = self.drv.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid, 1, 1
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = self.meta["block"]
        cfg.sharedMemBytes = self.meta["dyn_smem_bytes"]
        cfg.hStream = self.drv.CUstream(torch.cuda.current_stream().cuda_stream)
        ids = self.drv.CUlaunchAttributeID
        attrs = []
        if self.cluster > 1:
            a = self.drv.CUlaunchAttribute()
            a.id = ids.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
            a.value.clusterDim.x, a.value.clusterDim.y, a.value.clusterDim.z = self.cluster, 1, 1
            attrs.append(a)
        if pdl:
            a = self.drv.CUlaunchAttribute()
            a.id = ids.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            a.value.programmaticStreamSerializationAllowed = 1
            attrs.append(a)
        cfg.attrs = attrs
        cfg.numAttrs = len(attrs)
        return cfg

    def max_clusters(self, sms: int) -> int:
        """How many clusters (CTAs at size 1) of this kernel can be resident at once."""
        if self.cluster == 1:
            per_sm = self.check(self.drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(
                self.function, self.meta["block"][0], self.meta["dyn_smem_bytes"]),
                "cuOccupancyMaxActiveBlocksPerMultiprocessor")
            return per_sm * sms
        return self.check(self.drv.cuOccupancyMaxActiveClusters(self.function, self.config(sms * self.cluster)),
                          "cuOccupancyMaxActiveClusters")

    def launch(self, args: tuple, grid: int, pdl: bool = False):
        self.check(self.drv.cuLaunchKernelEx(self.config(grid, pdl), self.function, (args, self.types), 0),
                   "cuLaunchKernelEx(probe)")
