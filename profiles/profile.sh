#!/usr/bin/env bash
# Reproduces the committed profiles/profile-ep8-m{1,4,8}.{md,png,json,nsys-rep} on the GPU machine:
#   MEGAPRE_COMMIT=<short sha> bash profiles/profile.sh            (from anywhere; writes into profiles/)
#   MEGAPRE_COMMIT=<short sha> bash profiles/profile.sh --out "$OUT"   (extra arguments go to the command)
# Needs .megapre-cache (fused cubins, built here with `python -m megapre build`) and, for Nsight Systems,
# .nsys-libs (libdw/libelf for nsys's report importer; see profiles/README.md) carried along.
# Uses nsys from MEGAPRE_NSYS, PATH or the GPU machine's known path; the torch profiler where there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 -m megapre profile --m 1 4 8 --shapes ep8 --out profiles "$@"
