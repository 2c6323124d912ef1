set -u; REAL=$OUT; T=$(mktemp -d); export OUT=$T
nvidia-smi --query-gpu=name --format=csv,noheader > $T/card.txt
bash scripts/ab.sh ". .v2" --shapes ep8 --backends fused --m 1 2 4 7 8
export PYTHONPATH=$PWD
python3 scripts/trace_fused.py --graph --dump=gate_up ep8:8 > $T/trace-head.txt 2>&1
python3 -m pytest -q -rs tests/ > $T/pytest.txt 2>&1; tail -3 $T/pytest.txt
tar czf $REAL/all.tgz -C $T .
