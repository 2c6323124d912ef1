#!/usr/bin/env bash
# Interleaved A/B of `python -m megapre bench` on one machine, the way docs/performance-log.md's comparisons are
# made: every tree is benched in turn, and the whole round twice (a call's first bench can read ~0.6 us high), each
# tree with its own cubins, every other round in reverse order. A tree is the working tree "." or a scratch copy
# beside it, e.g. an older commit:
#   mkdir .v2 && git archive <sha> | tar -x -C .v2 && (cd .v2 && MEGAPRE_CACHE=$PWD/.megapre-cache \
#       PYTHONPATH=$PWD python -m megapre build)          # here, then carry .megapre-cache and .v2
# Usage (GPU machine, repository root): bash scripts/ab.sh ". .v2" [bench arguments, e.g. --shapes ep8 --backends fused]
# Writes $OUT/ab-<tree>-<round>.{txt,json} and prints the fused time of every shape and M, one line per bench.
set -uo pipefail
OUT=${OUT:-/tmp/megapre-out}
ROUNDS=${AB_ROUNDS:-2}
mkdir -p "$OUT"
trees=$1
shift
root=$PWD
rc=0
for round in $(seq 1 "$ROUNDS"); do
  # every other round in reverse order (A B, B A, ...): the bench's level drifts by 0.1-0.2 us from one bench to the
  # next (session 29, calls 6-7: an A/A run's pairs differed by up to 0.2 us, its four-round means by <= 0.025), and
  # alternating spreads that drift over every tree
  order=$trees
  [ $((round % 2)) -eq 0 ] && order=$(echo $trees | tr ' ' '\n' | tac | tr '\n' ' ')
  for tree in $order; do
    tag=$(basename "$(cd "$tree" && pwd)"); tag=${tag#.}
    [ "$tree" = "." ] && tag=head
    (cd "$tree" && MEGAPRE_CACHE="$root/$tree/.megapre-cache" PYTHONPATH="$root/$tree" \
      python3 -m megapre bench "$@" --json "$OUT/ab-$tag-$round.json") > "$OUT/ab-$tag-$round.txt" 2>&1
    rc=$(( rc | $? ))
    echo "$tag round $round: $(awk '$3 == "fused" {printf "%s M=%s %s  ", $1, $2, $4}' "$OUT/ab-$tag-$round.txt")"
  done
done
exit $rc
