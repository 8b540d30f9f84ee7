"""The vLLM worker extension that loads a podsrl version in place (``worker_extension_cls``).

vLLM mixes this class into every worker process; ``VLLMEngine.load`` calls its method by name
through ``LLM.collective_rpc``. Arguments cross vLLM's process boundary as msgpack, so a version
travels as ``(manifest, bytes)``: no tensors, no callables. Imported only inside vLLM's workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from protocol.messages import Weights
from protocol.weights import unpack_weights


class WeightReloader:
    """Methods added to vLLM's worker (``self`` is the worker: ``model_runner``, ``reload_weights``)."""

    def podsrl_load(self, version: int, tensors: list, data: bytes) -> int:
        """Load one complete version; returns the number of tensors loaded.

        The digests are verified again here (the bytes crossed a process boundary). ``reload_weights``
        with ``is_checkpoint_format=True`` takes checkpoint-layout tensors and redoes vLLM's
        post-load processing, which matters on CPU: vLLM repacks linear weights for its CPU kernels,
        so ``model.load_weights`` alone on a live CPU model fails. The caller resets the prefix cache.
        """
        msg = Weights(version=version, model_config="", tensors=tensors, files=[], data=np.frombuffer(data, np.uint8))
        named = unpack_weights(msg)
        worker: Any = self
        worker.reload_weights(weights_iterator=iter(named.items()), is_checkpoint_format=True)
        return len(named)
