"""The entry point shared by the CuTe-DSL probes that are built here and run on the GPU machine (diag_burst.py,
diag_wgmma.py, diag_order.py): `build` compiles their cubins on this machine (the DSL cannot be installed there),
`run [--json FILE]` loads and launches them there (torch or cupy + cuda-python, no DSL)."""
import sys


def main(doc: str, build, run) -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "build":
        build()
    elif len(sys.argv) > 1 and sys.argv[1] == "run":
        run(sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--json" else None)
    else:
        print(doc)
