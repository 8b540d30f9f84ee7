"""Only in the vLLM environment: ``bash scripts/vllm-env.sh && .venv-vllm/bin/python -m pytest -q tests/vllm_tests``.

The main suite never collects this directory (pyproject's ``norecursedirs``), so it never imports
vLLM; named explicitly without vLLM installed, these tests fail at once with the fix, never skip.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

if importlib.util.find_spec("vllm") is None:
    raise pytest.UsageError(
        "tests/vllm_tests need vLLM, which the main environment never has: "
        "bash scripts/vllm-env.sh && .venv-vllm/bin/python -m pytest -q tests/vllm_tests"
    )

# vLLM on CPU otherwise reserves rollout.engine.gpu_memory_utilization (0.5) of the machine's memory per engine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
