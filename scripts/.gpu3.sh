set -u; REAL=$OUT; T=$(mktemp -d); export OUT=$T
nvidia-smi --query-gpu=name --format=csv,noheader > $T/card.txt
bash scripts/ab.sh ". .v3 .v2" --shapes ep8 tp1 --backends fused --m 1 2 4 7 8
export PYTHONPATH=$PWD
python3 scripts/trace_fused.py --graph ep8:1 ep8:8 > $T/trace-head.txt 2>&1
python3 -m pytest -q -rs tests/ > $T/pytest.txt 2>&1; tail -3 $T/pytest.txt
tar czf $REAL/all.tgz -C $T .
