#!/usr/bin/env bash
# One call on the lent GPU machine runs everything that needs the GPU and leaves logs + JSON under $OUT:
#   tests (GPU tests included), the benchmark table, and (when asked) the Nsight Systems profile.
# Usage (from the repository root, on the GPU machine):
#   bash scripts/gpu-check.sh [tests] [bench] [bench-hmma] [ab] [whatif] [period] [demo] [trace] [sass] [profile] [reliability]
# The GPU machine cannot install packages: megapre runs from the source tree (PYTHONPATH) with its torch,
# triton and cuda-bindings; fused-kernel cubins come prebuilt in .megapre-cache/ (carried, see README).
set -uo pipefail
OUT=${OUT:-/tmp/megapre-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
steps=${*:-tests bench}
{
  echo "date: $(date -u +%FT%TZ)  commit: ${MEGAPRE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
rc=0
for step in $steps; do
  case $step in
    tests)
      python3 -m pytest -q -rs -s tests/ 2>&1 | tee "$OUT/pytest.log" | tail -40; rc=$(( rc | ${PIPESTATUS[0]} )) ;;
    bench)
      python3 -m megapre bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"; rc=$(( rc | ${PIPESTATUS[0]} )) ;;
    bench-hmma)  # A/B of the FP8 GEMM instruction in the same run (needs MEGAPRE_FP8_MMA=hmma cubins carried)
      MEGAPRE_FP8_MMA=hmma python3 -m megapre bench --json "$OUT/bench-hmma.json" 2>&1 | tee "$OUT/bench-hmma.txt"
      rc=$(( rc | ${PIPESTATUS[0]} )) ;;
    ab)  # the same bench at an older commit unpacked into .ab/ (git archive <sha> | tar -x -C .ab; build its cubins
         # into .ab/.megapre-cache, or into this cache, with MEGAPRE_CACHE), for an A/B on the same machine; carry .ab
      abcache="$PWD/.ab/.megapre-cache"; [ -d "$abcache" ] || abcache="$PWD/.megapre-cache"
      (cd .ab && MEGAPRE_CACHE="$abcache" PYTHONPATH="$PWD" python3 -m megapre bench --json "$OUT/bench-ab.json") \
        2>&1 | tee "$OUT/bench-ab.txt"; rc=$(( rc | ${PIPESTATUS[0]} )) ;;
    whatif)  # where the per-call time goes: the fused kernel with parts of its work left out (EP8; needs
             # `python -m megapre build --whatif --shapes ep8 --m 1 2 4 8` cubins carried; outputs wrong, timing only)
      python3 -m megapre bench --shapes ep8 --backends fused fused-no-norm fused-no-route fused-no-act \
        fused-no-weights fused-no-router-w fused-no-gu-w fused-no-down-w fused-no-fence fused-skeleton fused-queue fused-queue-no-fence fused-launch fused-empty fused-no-norm-hop fused-no-norm-hop-route --json "$OUT/bench-whatif.json" 2>&1 \
        | tee "$OUT/bench-whatif.txt"; rc=$(( rc | ${PIPESTATUS[0]} )) ;;
    period)  # the bench build's period split into the calls' chains and the launch boundary (what-if "stamps":
             # `python -m megapre build --whatif --shapes ep8 --m 1 2 4 8` cubins carried)
      python3 scripts/period_split.py --json "$OUT/period.json" 2>&1 | tee "$OUT/period.txt"; rc=$(( rc | ${PIPESTATUS[0]} )) ;;
    demo)
      python3 -m megapre demo 2>&1 | tee "$OUT/demo.txt"; rc=$(( rc | ${PIPESTATUS[0]} )) ;;
    profile)
      python3 -m megapre profile --out "$OUT" 2>&1 | tee "$OUT/profile.txt"; rc=$(( rc | ${PIPESTATUS[0]} )) ;;
    reliability)  # 100k graph replays, then compute-sanitizer memcheck / racecheck / synccheck
      # (--report-api-errors no: cuda-python probes driver symbols with cuGetProcAddress at import, which
      #  memcheck would otherwise count as 34 "errors" before any kernel runs)
      python3 scripts/longrun_fused.py 100000 2>&1 | tee "$OUT/longrun.txt"; rc=$(( rc | ${PIPESTATUS[0]} ))
      for tool in memcheck racecheck synccheck; do
        timeout 150 compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 python3 scripts/sanitize_fused.py 2>&1 \
          | grep -vE "^\s*$" | tail -12 | tee "$OUT/sanitize-$tool.txt"; rc=$(( rc | ${PIPESTATUS[0]} ))
      done ;;
    trace)  # in-kernel timeline (needs `python -m megapre build --trace` cubins) and the launch-setting sweep
      python3 scripts/trace_fused.py 2>&1 | tee "$OUT/trace.txt"; rc=$(( rc | ${PIPESTATUS[0]} ))
      # and without the TP8 prefetch delay (the default traces above have it: the norm's inputs go first)
      MEGAPRE_PREFETCH_DELAY_NS=0 python3 scripts/trace_fused.py ep8:1 2>&1 | tee "$OUT/trace-variants.txt"
      rc=$(( rc | ${PIPESTATUS[0]} ))
      # the bench's steady state: the last call of a replayed graph of 16 (PDL overlap with the call before)
      python3 scripts/trace_fused.py --graph ep8:1 ep8:8 2>&1 | tee -a "$OUT/trace-variants.txt"
      rc=$(( rc | ${PIPESTATUS[0]} ))
      python3 scripts/sweep_fused.py --json "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.txt"; rc=$(( rc | ${PIPESTATUS[0]} )) ;;
    sass)  # tensor-core instructions and resource usage of every cached cubin (cuobjdump is there, not here)
      for c in .megapre-cache/*/megapre.cubin; do
        sass=$(cuobjdump -sass "$c" 2>/dev/null)
        spec=$(python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['spec']; print(f\"I={s['inter']} M={s['m']} {s['fp8_mma']}{' trace' if s['trace'] else ''}{' staged' if s.get('staged') else ''}{' whatif=' + ','.join(s['whatif']) if s.get('whatif') else ''}\")" "${c%/*}/manifest.json")
        echo "$c ($spec): QGMMA $(grep -c QGMMA <<<"$sass"), HMMA $(grep -c HMMA <<<"$sass");" \
             "$(cuobjdump -res-usage "$c" 2>/dev/null | grep -oE 'REG:[0-9]+|STACK:[0-9]+|LOCAL:[0-9]+' | tr '\n' ' ')"
      done 2>&1 | tee "$OUT/sass.txt" ;;
    *) echo "unknown step $step"; rc=2 ;;
  esac
done
echo "gpu-check exit $rc"
exit $rc
