"""megapre: the DeepSeek-V3 MoE pre-amble (add + RMSNorm, router, grouped top-k, FP8 quant, shared expert,
token sorting) in one persistent GPU kernel, with an unfused fallback and an exact reference.

    out = megapre.run(hidden, residual, weights)          # backend="auto"

Importing megapre needs only torch: the CuTe DSL is used by the build step (megapre.host.build) alone.
"""
from .api import BACKENDS, FUSED_MAX_TOKENS, MAX_TOKENS, run
from .config import PreambleConfig
from .output import PreambleOutput, output_spec
from .weights import PreambleWeights
from .host.fused import MegapreKernelError, check_errors as check_fused

__all__ = ["run", "check_fused", "MegapreKernelError", "PreambleConfig", "PreambleWeights", "PreambleOutput", "output_spec", "BACKENDS",
           "FUSED_MAX_TOKENS", "MAX_TOKENS"]
__version__ = "0.1.0"
