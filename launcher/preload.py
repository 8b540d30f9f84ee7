"""What ``podsrl run``'s fork server imports once, before it forks any process (launcher/forkserver.py).

Imports only: nothing here may allocate on a device, start a thread or open a socket, since every
process forks from the interpreter this module leaves behind. ``tests/launcher/test_forkserver.py``
checks that CUDA stays uninitialised and that the fork server runs a single thread.
"""

from __future__ import annotations

import atexit
import os

import torch  # noqa: F401
import torch.distributed  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
from transformers.models.llama import modeling_llama  # noqa: F401  (the tiny model's architecture)
from transformers.models.qwen2 import modeling_qwen2  # noqa: F401

import learner.checkpoint  # noqa: F401
import learner.model  # noqa: F401
import learner.parallel  # noqa: F401
import learner.publisher  # noqa: F401
import learner.step  # noqa: F401
import learner.train  # noqa: F401
import rollout_server.engine  # noqa: F401
import rollout_server.server  # noqa: F401
import rollout_server.tasks  # noqa: F401
import selector.server  # noqa: F401

if os.environ.get("PODSRL_FORK_SERVER") == "1":  # (launcher.forkserver.SERVER_MARK) in the fork server only:
    # it holds no state, so it leaves at once when the launcher stops it, without the seconds a torch
    # interpreter's teardown takes (its forks leave through multiprocessing's os._exit, never through here)
    atexit.register(os._exit, 0)
