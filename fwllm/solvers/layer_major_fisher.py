"""Fisher merging layer-major (`gradient: layerwise`, causal LMs): no model-sized statistic.

The candidate-major order (`fwllm.solvers.streamed_fisher.fisher_sums`) finishes one candidate's
whole-model Fisher before the next starts, so it keeps three model-sized float32 sums on disk.
Here every candidate advances through the model together, and each layer's merge is finished
(and handed on) before the next layer down is touched:

  capture   each candidate's rows run up to the layer stack through its own embeddings;
  forward   layer by layer: the layer of each candidate in turn (a full candidate's from its
            own shards; a LoRA candidate's formed as base + its delta from the base layer, which
            is read once for all of them), run on its rows; every layer input is kept (host);
  top       each candidate's head and loss give every term's gradient at the stack output, and
            the Fisher of the final norm and head, folded at once;
  backward  from the top layer down: each candidate's layer is materialised again, recomputed
            from its checkpoint and backpropagated once per term; its weight gradients squared
            and summed are its layer Fisher F_i,l (RAM), folded at once, each term's input
            gradient carried down. After the last candidate, layer l's merge num/den is yielded;
  bottom    the embeddings, from each term's gradient at the stack input (a tied LM head /
            embedding adds the top path's part, kept per candidate until here).

The per-example, per-term squared gradients, the division by the number of examples, the floor
at epsilon and the weights are those of the candidate-major order; only the order changes. A
candidate's Fisher is never whole, so `normalize_fisher` (its mean first) is not covered here.

RAM held between layers, per candidate: its layer inputs ((layers + 1) x tokens x hidden per
example), every term's hidden-state gradient (terms x tokens x hidden per example: one term for the
empirical Fisher, positions x top_k for the exact one) and, when the embedding is tied to the
head, the top path's part of its Fisher; `held_bytes` prices it before anything runs. Besides
that: one materialised layer (plus, for a LoRA pool, the base layer it is formed from) and the
layer's two sums. This module writes no file: `merged()` yields (name, tensor) to the method's
store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Set, Tuple

import torch
from accelerate.utils import find_tied_parameters

from fwllm.arch.kinds import CAUSAL_MODEL
from fwllm.arch.layer_stack import layer_stack
from fwllm.arch.streaming import MetaModel, base_weights, skeleton
from fwllm.core.errors import FwllmError, check_finite
from fwllm.core.memory import return_free_memory
from fwllm.core.params import FisherParams
from fwllm.data.encoding import encode_task
from fwllm.data.objective import Objective
from fwllm.solvers.streamed_fisher import CandidateRun, CandidateWeights, StreamedFisher, causal_skeleton

ALL_AT_ONCE = 1 << 62  # checkpoint budget: every example in one group (the whole pass is one group)


class _BaseLayer(Mapping):
    """The base's tensors; those of the layer being processed are read once (`hold`) and serve
    every LoRA candidate's forming of its own layer from them."""

    def __init__(self, base: Mapping):
        self.base, self.stored, self.held = base, set(base), {}

    def hold(self, names: Sequence[str]) -> None:
        self.held = {n: self.base[n] for n in names if n in self.stored}

    def drop(self) -> None:
        self.held = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        held = self.held.get(name)
        return held if held is not None else self.base[name]

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


@dataclass
class _Pass:
    """One candidate's part of the pass."""

    run: CandidateRun
    fisher: StreamedFisher
    terms: List = field(default_factory=list)  # its examples (one micro-batch each)
    live: List = field(default_factory=list)  # those that predict something (the examples counted)
    held: Dict[str, torch.Tensor] = field(default_factory=dict)  # top-path Fisher finished at the bottom
    folded_top: Set[str] = field(default_factory=set)
    examples: int = 0
    n_terms: int = 0
    total: float = 0.0  # the sum of its Fisher (divided by examples): the mean's numerator


class _Fold:
    """Per tensor, sum_i w_i F~_i theta_i and sum_i w_i F~_i (RAM) until every candidate has added."""

    def __init__(self, count: int, epsilon: float):
        self.count, self.epsilon = count, epsilon
        self.num: Dict[str, torch.Tensor] = {}
        self.den: Dict[str, torch.Tensor] = {}
        self.seen: Dict[str, int] = {}

    def add(self, label: str, name: str, fisher: torch.Tensor, theta: torch.Tensor, weight: float) -> None:
        """Takes `fisher` over (it is scaled in place). In place throughout: for a head or embedding
        matrix each out-of-place step was another vocab x hidden float32 copy at the phase's peak."""
        check_finite(f"Fisher of candidate {label}", name, fisher)
        f = fisher.float().clamp_min_(self.epsilon).mul_(weight)
        theta = theta.detach().float()
        if name in self.num:
            self.num[name].addcmul_(f, theta)
            self.den[name].add_(f)
        else:
            self.num[name] = f * theta
            self.den[name] = f
        self.seen[name] = self.seen.get(name, 0) + 1

    def ready(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """The merge of every tensor all candidates have added to (then forgotten)."""
        for name in [n for n, c in self.seen.items() if c == self.count]:
            del self.seen[name]
            yield name, self.num.pop(name).div_(self.den.pop(name))


class LayerMajorFisher:
    """`merged()` yields (name, sum_i w_i F~_i theta_i / sum_i w_i F~_i) for every `covered` parameter;
    after it, `metas` holds each candidate's meta (examples, terms, mean) as the other orders report it."""

    def __init__(
        self,
        base_dir: str,
        runs: Sequence[CandidateRun],
        covered: Dict[str, Tuple[int, ...]],
        tokenizer,
        p: FisherParams,
        device: str = "cpu",
    ):
        self.names, self.p = list(covered), p
        self.numel = sum(int(torch.Size(s).numel()) for s in covered.values())
        self.base = _BaseLayer(base_weights(base_dir))
        self.passes = [self._open(run, tokenizer, device) for run in runs]
        self.lora = any(ps.run.candidate.adapter is not None for ps in self.passes)
        self.fold = _Fold(len(self.passes), p.epsilon)
        self.metas: List[dict] = []

    def _open(self, run: CandidateRun, tokenizer, device: str) -> _Pass:
        model, kind = causal_skeleton(run)
        # a full candidate's tensors are its own; an adapter's the base's (read once per layer) + its delta
        own = base_weights(run.model_dir) if run.candidate.adapter is None else None
        weights = own if own is not None else CandidateWeights(self.base, run.candidate)
        p = self.p
        objective = Objective([encode_task(run.task, tokenizer, p.max_length, batch_size=1, model_kind=kind)])
        meta = MetaModel(model, weights, device, trainable=self.names)
        fisher = StreamedFisher(meta, objective, p, self.names, checkpoint_bytes=ALL_AT_ONCE)
        return _Pass(run, fisher, [t for group in fisher._groups(objective) for t in group])

    # -- the pass ----------------------------------------------------------------------------
    def merged(self) -> Iterator[Tuple[str, torch.Tensor]]:
        layers = len(self.passes[0].fisher.layers)
        try:
            for ps in self.passes:
                with ps.fisher._outer_phase():
                    for t in ps.terms:
                        ps.fisher._capture(t)
            for i in range(layers):
                self._each_layer(i, lambda ps: ps.fisher._forward_layer(i, ps.terms, keep=True))
            for ps in self.passes:
                self._top(ps)
            yield from self.fold.ready()
            for i in reversed(range(layers)):
                self._each_layer(i, lambda ps: ps.fisher._backward_layer(i, ps.live, self._adder(ps)))
                yield from self.fold.ready()
            for ps in self.passes:
                self._bottom(ps)
            yield from self.fold.ready()
        finally:
            for ps in self.passes:
                ps.terms, ps.live, ps.held = [], [], {}
        if self.fold.seen:  # every candidate folds every covered tensor once: a defect otherwise
            raise FwllmError(f"fisher: layer-major merge left {sorted(self.fold.seen)[:3]} unfinished")
        self.metas = [self._meta(ps) for ps in self.passes]

    def _each_layer(self, i: int, step) -> None:
        """`step(pass)` for every candidate on layer i, the base layer read once for a LoRA pool."""
        if self.lora:
            self.base.hold(self.passes[0].fisher.layer_params[i])
        try:
            for ps in self.passes:
                step(ps)
        finally:
            self.base.drop()
            return_free_memory()

    def _adder(self, ps: _Pass):
        """Adds one tensor's Fisher sum to the fold, while the candidate's tensor is materialised."""
        return lambda name, acc: self._add(ps, name, acc, ps.fisher.model.get_parameter(name))

    def _add(self, ps: _Pass, name: str, acc: torch.Tensor, theta: torch.Tensor) -> None:
        f = acc.div_(max(ps.examples, 1))  # the accumulator is not used again
        ps.total += float(f.sum(dtype=torch.float64))
        self.fold.add(ps.run.candidate.label, name, f, theta, ps.run.weight)

    def _top(self, ps: _Pass) -> None:
        fisher = ps.fisher
        with fisher._outer_phase() as outer:
            acc = {n: torch.zeros_like(q) for n, q in outer.items()}
            # an example that predicts nothing is no example: its checkpoints go with `terms`
            ps.live, ps.terms = [t for t in ps.terms if fisher._top_terms(t, outer, acc)], []
            ps.examples, ps.n_terms = len(ps.live), sum(len(t.weights) for t in ps.live)
            for n, a in acc.items():
                if outer[n] is fisher.input_embedding or not bool(a.any()):
                    if bool(a.any()):
                        ps.held[n] = a  # a tied embedding: its bottom path adds to it
                    continue  # the bottom path (the embeddings) finishes it
                self._add(ps, n, a, outer[n])
                ps.folded_top.add(n)

    def _bottom(self, ps: _Pass) -> None:
        fisher = ps.fisher
        with fisher._outer_phase() as outer:
            acc = {n: ps.held.pop(n) if n in ps.held else torch.zeros_like(q) for n, q in outer.items()}
            if ps.live:
                fisher._bottom_terms(ps.live, outer, acc)
            for n, a in acc.items():
                if n not in ps.folded_top:
                    self._add(ps, n, a, outer[n])
                elif bool(a.any()):
                    raise FwllmError(
                        f"fisher: {n} of {type(fisher.model).__name__} is used both before and after the "
                        "layer stack without being the tied input embedding (use gradient: full)"
                    )
        ps.live = []

    def _meta(self, ps: _Pass) -> dict:
        return {
            "examples": ps.examples,
            "terms": ps.n_terms,
            "mean": ps.total / max(self.numel, 1),
            "gradient": "layerwise",
            "layer_fetches": ps.fisher.meta.fetches,
            "peak_resident_bytes": ps.fisher.meta.peak_resident_bytes,
        }


def held_bytes(base_dir: str, runs: Sequence[CandidateRun], tokenizer, p: FisherParams) -> int:
    """An upper bound on the per-candidate state the layer-major order holds between layers, over all
    candidates: per example of T tokens, (layers + 1) layer inputs and one hidden-state gradient per
    term (T x hidden floats each; exact Fisher: at most T positions x top_k terms), the layer
    arguments (a T x T mask, rotary tables); with a tied embedding, each term's rows of it and the
    top path's part of its Fisher (vocab x hidden) per candidate."""
    model = skeleton(base_dir)
    _, stack = layer_stack(model)
    vocab, hidden = (int(d) for d in model.get_input_embeddings().weight.shape)
    tied = bool(find_tied_parameters(model))
    k = vocab if p.top_k <= 0 else min(p.top_k, vocab)
    total = 0
    for run in runs:
        encoded = encode_task(run.task, tokenizer, p.max_length, batch_size=1, model_kind=CAUSAL_MODEL)
        for batch in encoded.batches:
            tokens = int(batch["input_ids"].numel())
            terms = 1 if p.fisher == "empirical" else tokens * k
            vectors = len(stack) + 1 + terms * (2 if tied else 1) + 2
            total += 4 * tokens * (hidden * vectors + tokens)
        if tied:
            total += 4 * vocab * hidden
    return total
