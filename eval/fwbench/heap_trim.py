"""How often fwllm hands freed heap memory back (eval/bench_heap_trim.py compares the three),
switched from outside: fwllm itself always trims after every released layer and evaluation
(`fwllm.core.memory.return_free_memory`) and has no switch."""

from __future__ import annotations

from typing import Optional

TRIM_MODES = ("layer", "evaluation", "off")


def set_heap_trim(mode: Optional[str]) -> None:
    """ "layer" (or None): fwllm as shipped; "off": never trim; "evaluation": trim only after each
    whole evaluation of the streamed gradient (its one call site), not after each layer."""
    from fwllm.core import memory
    from fwllm.solvers import streamed_gradient

    if mode not in (None, "") + TRIM_MODES:
        raise ValueError(f"heap trim {mode!r}: choose from {', '.join(TRIM_MODES)}")
    if mode in (None, "", "layer"):
        return
    trim = memory._TRIM
    memory._TRIM = None  # every layer-level call site now does nothing
    if mode == "evaluation" and trim is not None:
        streamed_gradient.return_free_memory = lambda: trim(0)
