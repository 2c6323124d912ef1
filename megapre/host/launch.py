"""Loading and launching the megakernel cubin with cuda-python (no DSL at run time).

The megakernel launch carries the programmatic-dependent-launch attribute (PDL: the kernel may be scheduled
while the previous kernel in the stream drains; it prefetches weights, then waits in griddepcontrol.wait), or,
with MEGAPRE_PDL=0, the cooperative attribute. Either way on torch's current stream, with raw device pointers
and no host synchronization, so it can be captured in a CUDA graph. Every driver call's return code is checked.
"""
from __future__ import annotations

import ctypes
import threading

import torch

_CTYPES = {"u64": ctypes.c_uint64, "s32": ctypes.c_int32}
_lock = threading.Lock()


def _driver():
    from cuda.bindings import driver
    return driver


def check(result, what: str):
    """cuda-python returns (err, *values); raise on any error, return the values."""
    drv = _driver()
    err, *vals = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        _, name = drv.cuGetErrorName(err)
        _, msg = drv.cuGetErrorString(err)
        raise RuntimeError(f"{what} failed: {name.decode() if name else err} ({msg.decode() if msg else ''})")
    return vals[0] if len(vals) == 1 else vals


class LoadedKernel:
    """One cubin loaded into torch's context on one device."""

    def __init__(self, cubin: bytes, manifest: dict, device: torch.device):
        drv = _driver()
        self.manifest = manifest
        self.device = device
        with torch.cuda.device(device):
            torch.cuda.init()
            torch.empty(1, device=device)  # make sure torch's primary context is current
            self.module = check(drv.cuModuleLoadData(cubin), "cuModuleLoadData")
            self.function = check(drv.cuModuleGetFunction(self.module, manifest["symbol"].encode()),
                                  "cuModuleGetFunction")
            smem = int(manifest["dyn_smem_bytes"])
            check(drv.cuFuncSetAttribute(self.function,
                                         drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                         smem), "cuFuncSetAttribute(max dynamic smem)")
            # thread-block clusters (the diagnostic probes' cubins; the megakernel has none): launched with the
            # cluster-dimension attribute, and sizes above the portable 8 must be allowed explicitly
            self.cluster = int(manifest.get("cluster", 1))
            if self.cluster > 8:
                check(drv.cuFuncSetAttribute(
                    self.function, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1),
                    "cuFuncSetAttribute(non-portable cluster size)")
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
            per_sm = check(drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(self.function, manifest["block"][0],
                                                                           smem),
                           "cuOccupancyMaxActiveBlocksPerMultiprocessor")
        self.per_sm = per_sm
        if per_sm < 1:
            raise RuntimeError(f"megakernel cannot run on {torch.cuda.get_device_name(device)}: "
                               f"0 CTAs fit per SM with {smem} bytes of shared memory")
        self.smem = smem
        self.types = tuple(_CTYPES[t] for t in manifest["param_types"])

    def launch_config(self, grid: int, stream: torch.cuda.Stream | None = None, cooperative: bool = False,
                      pdl: bool = False):
        """The CUlaunchConfig of a launch of `grid` CTAs on `stream` (torch's current one by default)."""
        drv = _driver()
        stream = stream or torch.cuda.current_stream(self.device)
        cfg = drv.CUlaunchConfig()
        cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid, 1, 1
        cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = self.manifest["block"]
        cfg.sharedMemBytes = self.smem
        cfg.hStream = drv.CUstream(stream.cuda_stream)
        attrs = []
        if cooperative:
            attr = drv.CUlaunchAttribute()
            attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
            attr.value.cooperative = 1
            attrs.append(attr)
        if pdl:
            attr = drv.CUlaunchAttribute()
            attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            attr.value.programmaticStreamSerializationAllowed = 1
            attrs.append(attr)
        if self.cluster > 1:
            attr = drv.CUlaunchAttribute()
            attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
            attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = self.cluster, 1, 1
            attrs.append(attr)
        cfg.attrs = attrs
        cfg.numAttrs = len(attrs)
        return cfg

    def launch(self, args: tuple, grid: int, stream: torch.cuda.Stream | None = None, cooperative: bool = False,
               pdl: bool = False):
        check(_driver().cuLaunchKernelEx(self.launch_config(grid, stream, cooperative, pdl), self.function,
                                         (args, self.types), 0), "cuLaunchKernelEx(megapre)")


_loaded: dict = {}


def get_kernel(cubin: bytes, manifest: dict, key: str, device: torch.device) -> LoadedKernel:
    k = (key, device.index)
    with _lock:
        if k not in _loaded:
            _loaded[k] = LoadedKernel(cubin, manifest, device)
        return _loaded[k]
