#!/usr/bin/env bash
# Developer entry point on a CPU or GPU machine where pip works:
#   bash scripts/dev.sh demo     install what is missing, then: python -m megapre demo
#   bash scripts/dev.sh test     install what is missing, then: python -m pytest -q   (CI runs this)
#   bash scripts/dev.sh install  only the install step
# torch: an installed torch is kept (CUDA or CPU build). With none, torch 2.13.0 is installed (on the
# project's CPU machines that is a local CPU wheel; elsewhere pip downloads it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

install() {
  if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
  fi
  if ! "$PY" -c "import megapre, cutlass, cuda.bindings, pytest" 2>/dev/null \
     || [ "$("$PY" -c 'import megapre, os; print(os.path.dirname(os.path.dirname(megapre.__file__)))')" != "$PWD" ]; then
    "$PY" -m pip install -q -e ".[test]"
  fi
}

case "${1:-test}" in
  install) install ;;
  demo) install; shift || true; exec "$PY" -m megapre demo "$@" ;;
  test) install; shift || true; exec "$PY" -m pytest -q "$@" ;;
  *) echo "usage: $0 {demo|test|install}" >&2; exit 2 ;;
esac
