"""The benchmark switches fwllm's heap trim from outside (fwllm has no switch)."""

import pytest

from fwbench.heap_trim import set_heap_trim
from fwllm.core import memory
from fwllm.solvers import streamed_gradient


@pytest.fixture
def trims(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_TRIM", lambda pad: calls.append(pad))
    # restored after the test, whatever set_heap_trim puts there
    monkeypatch.setattr(streamed_gradient, "return_free_memory", streamed_gradient.return_free_memory)
    return calls


def test_fwllm_trims_at_every_call_as_shipped(trims):
    set_heap_trim("layer")
    memory.return_free_memory()
    streamed_gradient.return_free_memory()
    assert trims == [0, 0]


def test_evaluation_mode_trims_only_after_a_whole_evaluation(trims):
    set_heap_trim("evaluation")
    memory.return_free_memory()  # what every layer-level call site runs
    assert trims == []
    streamed_gradient.return_free_memory()  # the end of a streamed evaluation
    assert trims == [0]


def test_off_never_trims_and_a_typo_is_refused(trims):
    set_heap_trim("off")
    memory.return_free_memory()
    streamed_gradient.return_free_memory()
    assert trims == []
    with pytest.raises(ValueError, match="choose from"):
        set_heap_trim("evaluations")
