"""Host side: reference, unfused backend, task plan, cubin build/cache and the cuda-python launcher.

Nothing here imports the CuTe DSL (``cutlass``) at module import time; only ``build`` does, lazily.
"""
