"""A user's plug-in named in the config, ``package.module:name`` or ``path/to/file.py:name``, or a built-in name:
how ``task.reward`` and ``task.environment`` find their functions and classes (docs/TASKS.md)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rollout_server.tasks.data import TaskError


def load_plugin(key: str, spec: str, builtins: Mapping[str, Any], kind: str) -> Any:
    """The object ``spec`` names (a built-in, or an attribute of a module or file), or TaskError naming the fix;
    ``key`` is the config key and ``kind`` what it holds ("function", "Class"), for the messages."""
    if spec in builtins:
        return builtins[spec]
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise TaskError(
            f"{key}={spec!r} is neither a built-in ({', '.join(sorted(builtins))}) nor "
            f"'package.module:{kind}' / 'path/to/file.py:{kind}'"
        )
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.exists():
                raise TaskError(f"{key}={spec!r}: file {target} does not exist")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # the working directory, as `python -m` has it
            module = importlib.import_module(target)
    except TaskError:
        raise
    except Exception as e:
        raise TaskError(
            f"{key}={spec!r}: importing {target} failed ({type(e).__name__}: {e}); check the "
            "module is on PYTHONPATH (or give a path/to/file.py) and imports cleanly"
        ) from None
    found = getattr(module, name, None)
    if found is None:
        raise TaskError(f"{key}={spec!r}: {target} has no {kind.lower()} {name!r}")
    return found
