"""Fisher merging layer-major (`gradient: layerwise`, causal LMs): no model-sized statistic.

The candidate-major order (`fwllm.solvers.streamed_fisher.fisher_sums`) finishes one candidate's
whole-model Fisher before the next starts, so it keeps three model-sized float32 sums on disk.
Here every candidate advances through the model together, and each layer's merge is finished
(and handed on) before the next layer down is touched:

  capture   each candidate's rows run up to the layer stack through its own embeddings;
  forward   layer by layer: the layer of each candidate in turn (a full candidate's from its
            own shards; a plain LoRA candidate's is the base layer, read once for all of them and
            shared, with its low-rank terms as hooks; another adapter's (DoRA, full tensors) formed
            as base + its delta), run on its rows; every layer input is kept (host);
  top       each candidate's head and loss give every term's gradient at the stack output, and
            the Fisher of the final norm and head, folded at once;
  backward  from the top layer down: each candidate's layer is materialised again, recomputed
            from its checkpoint and backpropagated once per term; its weight gradients squared
            and summed are its layer Fisher F_i,l (RAM), folded at once, each term's input
            gradient carried down (a plain LoRA candidate's linear weight gradient is dY^T X from
            hooks, and its theta = W0 + s B A is formed once, for the fold). After the last
            candidate, layer l's merge num/den is yielded;
  bottom    the embeddings, from each term's gradient at the stack input (a tied LM head /
            embedding adds the top path's part, kept per candidate until here).

On a pool of adapters only, a tensor none of them changes (embeddings, head, norms) merges to the
base whatever the Fishers: it is not folded (the base is yielded), and only its Fisher's sum is taken,
for the reported mean (a head's or an embedding's from its module's inputs and output gradients,
`fwllm.kernels.fisher`, never the vocab x hidden gradient).

The per-example, per-term squared gradients, the division by the number of examples, the floor
at epsilon and the weights are those of the candidate-major order; only the order changes. A
candidate's Fisher is never whole, so `normalize_fisher` (its mean first) is not covered here.

RAM held between layers, per candidate: its layer inputs ((layers + 1) x tokens x hidden per
example; with `spill_dir`, file-backed pages the kernel may drop, `fwllm.io.spill`), every term's
hidden-state gradient (terms x tokens x hidden per example: one term for the empirical Fisher,
positions x top_k for the exact one) and, when the embedding is tied to the
head, the top path's part of its Fisher; `held_bytes` prices it before anything runs. Besides
that: one materialised layer (plus, for a LoRA pool, the base layer it is formed from) and the
layer's two sums. This module writes no file: `merged()` yields (name, tensor) to the method's
store.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from accelerate.utils import find_tied_parameters

from fwllm.arch.kinds import CAUSAL_MODEL
from fwllm.arch.layer_stack import layer_stack
from fwllm.arch.streaming import MetaModel, base_weights, fetched_around_forward, skeleton
from fwllm.core.errors import FwllmError, check_finite
from fwllm.core.memory import return_free_memory
from fwllm.core.params import FisherParams
from fwllm.data.encoding import encode_task
from fwllm.data.objective import Objective
from fwllm.io.spill import FileSpill
from fwllm.kernels.fisher import linear_square_sum, total
from fwllm.solvers.lora_terms import LoraTerms, pool_is_low_rank
from fwllm.solvers.streamed_fisher import (
    CandidateRun,
    CandidateWeights,
    StreamedFisher,
    causal_skeleton,
)

ALL_AT_ONCE = 1 << 62  # checkpoint budget: every example in one group (the whole pass is one group)


class _BaseLayer(Mapping):
    """The base's tensors; those of the layer being processed are read once (`hold`) and serve
    every LoRA candidate's forming of its own layer from them."""

    def __init__(self, base: Mapping):
        self.base, self.stored, self.held = base, set(base), {}

    def hold(self, names: Sequence[str]) -> None:
        self.held = {n: self.base[n].to(torch.float32) for n in names if n in self.stored}

    def drop(self) -> None:
        self.held = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        held = self.held.get(name)
        return held if held is not None else self.base[name]

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


class _SquaredTotal:
    """In place of a tensor's Fisher accumulator where only its sum is needed (a tensor no candidate
    changes: its merge is the base whatever the Fisher; the sum still enters the reported mean)."""

    def __init__(self):
        self.total = 0.0

    def add_(self, x: torch.Tensor, alpha: float = 1.0) -> "_SquaredTotal":
        self.total += alpha * float(x.sum(dtype=torch.float64))
        return self

    def any(self) -> bool:
        return self.total != 0.0


class _LoraFisher(StreamedFisher):
    """A plain LoRA candidate's streamer: its layer is the base layer held for every candidate (shared,
    not copied) with its low-rank terms as hooks (`LoraTerms`), never W0 + s B A formed densely. A
    linear weight's per-term gradient is dY^T X, from the layer input X and output gradient dY its
    hooks capture: the same product autograd would form, and the base weight itself needs none."""

    def __init__(self, meta: MetaModel, objective: Objective, p: FisherParams, names, base: _BaseLayer, lora):
        super().__init__(meta, objective, p, names, checkpoint_bytes=ALL_AT_ONCE)
        self.base, self.lora = base, lora
        lora.attach(self.model)

    def _fetch_layer(self, i: int) -> None:
        self.meta.fetch(self.layer_params[i], self.base.held, copy=False)

    @contextlib.contextmanager
    def _streamed_outer(self):
        """As the base class's, from the base's outer tensors held for every candidate (shared, no copy)."""
        held = all(n in self.base.held for n in self.outer_trainable)
        self.meta.fetch(self.outer_trainable, self.base.held if held else None, copy=not held)
        try:
            with fetched_around_forward(self.meta, self._frozen_outer):
                yield
        finally:
            self.meta.release(self.outer_trainable)

    def _linear_weights(self, names: Sequence[str]) -> Dict[str, torch.nn.Linear]:
        out = {}
        for n in names:
            module_name, _, attr = n.rpartition(".")
            module = self.model.get_submodule(module_name)
            if attr == "weight" and type(module) is torch.nn.Linear:
                out[n] = module
        return out

    def _backward_layer(self, i: int, terms: Sequence, add) -> None:
        device = self.meta.device
        self._fetch_layer(i)
        handles = []
        try:
            names = [n for n in self.layer_params[i] if n in self.blocks]
            linear = self._linear_weights(names)
            other = [n for n in names if n not in linear]
            params = [self.model.get_parameter(n) for n in other]
            acc: Dict[str, torch.Tensor] = {}
            seen: Dict[str, List] = {n: [] for n in linear}  # per call: [input, output gradient]

            def capture(name):
                def hook(module, args, out):
                    call = [args[0].detach(), None]
                    seen[name].append(call)
                    out.register_hook(lambda g: call.__setitem__(1, g.detach()))

                return hook

            for n, module in linear.items():
                handles.append(module.register_forward_hook(capture(n)))
            for t in terms:
                x = t.inputs[i].to(device).requires_grad_(True)
                args, kwargs = t.calls[i]
                for calls in seen.values():
                    calls.clear()
                with torch.enable_grad():
                    out = self._forwards[i](x, *args, **kwargs)
                for j, w in enumerate(t.weights):
                    for calls in seen.values():
                        for call in calls:
                            call[1] = None  # this term's output gradient only
                    grads = torch.autograd.grad(
                        out,
                        [x] + params,
                        grad_outputs=t.grads[j].to(device),
                        retain_graph=j < len(t.weights) - 1,
                        allow_unused=True,
                    )
                    t.grads[j] = (grads[0] if grads[0] is not None else torch.zeros_like(x)).to(self.host)
                    for n, g in zip(other, grads[1:]):
                        if g is not None:
                            _square_into(acc, n, g, w)
                    for n, calls in seen.items():
                        # a module called twice: its gradients add before squaring (rows concatenated)
                        pairs = [(inp, dy) for inp, dy in calls if dy is not None]
                        if not pairs:
                            continue
                        xs = torch.cat([inp.reshape(-1, inp.shape[-1]) for inp, _ in pairs])
                        dys = torch.cat([dy.reshape(-1, dy.shape[-1]) for _, dy in pairs])
                        if n in self.sums_only:  # untouched by every candidate: its sum only
                            acc.setdefault(n, _SquaredTotal()).add_(linear_square_sum(xs, dys), alpha=w)
                        else:
                            _square_into(acc, n, dys.T @ xs, w)
                t.inputs[i] = None
            for calls in seen.values():
                calls.clear()
            for n in names:
                add(n, acc[n] if n in acc else torch.zeros_like(self.model.get_parameter(n)))
        finally:
            for h in handles:
                h.remove()
            self.meta.release(self.layer_params[i])


def _square_into(acc: Dict[str, torch.Tensor], name: str, g: torch.Tensor, w: float) -> None:
    """acc[name] += w g^2, in one pass (`g`, a fresh gradient, is not used again)."""
    if name in acc:
        acc[name].addcmul_(g, g, value=w)
    else:
        acc[name] = g.float().square_().mul_(w) if w != 1 else g.float().square_()


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

    def add(
        self,
        label: str,
        name: str,
        fisher: torch.Tensor,
        theta: torch.Tensor,
        weight: float,
        scale: float = 1.0,
    ) -> None:
        """Folds w F~ theta, F~ = max(scale * `fisher`, epsilon). Takes `fisher` over (it is scaled in
        place; the caller checked it finite). In place throughout: for a head or embedding matrix each
        out-of-place step was another vocab x hidden float32 copy at the phase's peak."""
        f = fisher.float()
        if weight > 0:  # w max(s F, eps) = max(w s F, w eps): one pass fewer over the tensor
            f.mul_(weight * scale).clamp_min_(self.epsilon * weight)
        else:
            f.mul_(scale).clamp_min_(self.epsilon).mul_(weight)
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
        spill_dir: Optional[str] = None,
    ):
        self.names, self.p = list(covered), p
        self.numel = sum(int(torch.Size(s).numel()) for s in covered.values())
        self.base = _BaseLayer(base_weights(base_dir))
        self.passes = [self._open(run, tokenizer, device) for run in runs]
        if spill_dir is not None:  # the checkpoints held from the forward to the backward, file-backed
            spill = FileSpill(spill_dir)
            for ps in self.passes:
                ps.fisher.spill = spill
        self.lora = any(ps.run.candidate.adapter is not None for ps in self.passes)
        self.untouched = self._untouched()
        for ps in self.passes:
            ps.fisher.sums_only = self.untouched
        self.fold = _Fold(len(self.passes), p.epsilon)
        self.metas: List[dict] = []
        # where the pass's seconds went (the plan records them; benchmarks read them): the phases, the
        # fold (theta formed, added to the sums; inside the backward's) and the consumer of `merged()`
        self.timings: Dict[str, float] = {}

    def _untouched(self) -> Set[str]:
        """Covered tensors no candidate changes (every candidate an adapter without them): every theta_i
        is the base's, so the merge is the base whatever the Fisher; only their Fisher's sum is taken
        (for the reported mean). A tied tensor is left to the full path (its two gradient paths)."""
        adapters = [ps.run.candidate.adapter for ps in self.passes]
        if any(a is None for a in adapters):
            return set()
        touched = {n for a in adapters for n in (*a.factors, *a.full)}
        meta = self.passes[0].fisher.meta
        return {n for n in self.names if n not in touched and len(meta.group(n)) == 1}

    def _open(self, run: CandidateRun, tokenizer, device: str) -> _Pass:
        model, kind = causal_skeleton(run)
        # a full candidate's tensors are its own; an adapter's the base's (read once per layer) + its delta
        own = base_weights(run.model_dir) if run.candidate.adapter is None else None
        weights = own if own is not None else CandidateWeights(self.base, run.candidate)
        p = self.p
        objective = Objective([encode_task(run.task, tokenizer, p.max_length, batch_size=1, model_kind=kind)])
        adapter = run.candidate.adapter
        if adapter is not None and pool_is_low_rank([adapter]):  # base layer + its low-rank hooks
            meta = MetaModel(model, self.base, device, trainable=self.names)
            lora = LoraTerms([adapter])
            for name in lora.names():
                lora.set_coefficients(name, [1.0])  # the candidate itself: base + s B A
            fisher = _LoraFisher(meta, objective, p, self.names, self.base, lora)
        else:
            meta = MetaModel(model, weights, device, trainable=self.names)
            fisher = StreamedFisher(meta, objective, p, self.names, checkpoint_bytes=ALL_AT_ONCE)
        return _Pass(run, fisher, [t for group in fisher._groups(objective) for t in group])

    # -- the pass ----------------------------------------------------------------------------
    def merged(self) -> Iterator[Tuple[str, torch.Tensor]]:
        layers = len(self.passes[0].fisher.layers)
        try:
            with self._timed("capture_s"):
                self._each_outer(self._capture)
            with self._timed("forward_s"):
                for i in range(layers):
                    self._each_layer(i, lambda ps: ps.fisher._forward_layer(i, ps.terms, keep=True))
            with self._timed("top_s"):
                self._each_outer(self._top)
            yield from self._handed(self.fold.ready())
            for i in reversed(range(layers)):
                self._hold(i)
                try:
                    with self._timed("backward_s"):
                        for ps in self.passes:
                            ps.fisher._backward_layer(i, ps.live, self._adder(ps))
                    yield from self._handed(self.fold.ready())
                    yield from self._handed(self._as_base(self.passes[0].fisher.layer_params[i]))
                finally:
                    self._drop()
            with self._timed("bottom_s"):
                self._each_outer(self._bottom)
            yield from self._handed(self.fold.ready())
            yield from self._handed(self._as_base(self.passes[0].fisher.outer_trainable))
        finally:
            for ps in self.passes:
                ps.terms, ps.live, ps.held = [], [], {}
        if self.fold.seen:  # every candidate folds every covered tensor once: a defect otherwise
            raise FwllmError(f"fisher: layer-major merge left {sorted(self.fold.seen)[:3]} unfinished")
        self.metas = [self._meta(ps) for ps in self.passes]

    @contextlib.contextmanager
    def _timed(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t0

    def _handed(self, items: Iterator[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
        """`items`, the seconds the consumer takes with each (storing it) counted as "stored_s"."""
        for item in items:
            with self._timed("stored_s"):
                yield item

    def _each_layer(self, i: int, step) -> None:
        """`step(pass)` for every candidate on layer i, the base layer read once for a LoRA pool."""
        self._hold(i)
        try:
            for ps in self.passes:
                step(ps)
        finally:
            self._drop()

    def _each_outer(self, step) -> None:
        """`step(pass)` for every candidate, the base's outer tensors (embeddings, norm, head) read once
        for the plain LoRA candidates (whose own they are) instead of once per candidate."""
        if any(isinstance(ps.fisher, _LoraFisher) for ps in self.passes):
            self.base.hold(self.passes[0].fisher.outer_trainable)
        try:
            for ps in self.passes:
                step(ps)
        finally:
            self._drop()

    @staticmethod
    def _capture(ps: _Pass) -> None:
        with ps.fisher._outer_phase():
            for t in ps.terms:
                ps.fisher._capture(t)

    def _hold(self, i: int) -> None:
        if self.lora:
            self.base.hold(self.passes[0].fisher.layer_params[i])

    def _drop(self) -> None:
        self.base.drop()
        return_free_memory()

    def _as_base(self, names: Sequence[str]) -> Iterator[Tuple[str, torch.Tensor]]:
        """The merge of the untouched tensors among `names`: the base's (float32, as the fold gives)."""
        for n in names:
            if n in self.untouched:
                yield n, self.base[n].to(torch.float32, copy=True)

    def _adder(self, ps: _Pass):
        """Adds one tensor's Fisher sum to the fold, while the candidate's layer is materialised."""
        return lambda name, acc: self._add(ps, name, acc, lambda: self._theta(ps, name))

    def _theta(self, ps: _Pass, name: str) -> torch.Tensor:
        """The candidate's tensor: materialised in its skeleton, or for a LoRA candidate run on the base
        with hooks, formed here once: base + s B A."""
        param = ps.fisher.model.get_parameter(name)
        adapter = ps.run.candidate.adapter
        factors = adapter.factors.get(name) if adapter is not None else None
        if not isinstance(ps.fisher, _LoraFisher) or factors is None:
            return param
        a, b = factors.a.float(), factors.b.float()
        for what, t in (("A", a), ("B", b)):  # a NaN/inf in s B A comes from its factors: check those
            check_finite(f"LoRA factor {what} of candidate {ps.run.candidate.label}", name, t)
        # one pass over the tensor: base + s B A as peft merges it (a plain LoRA: `pool_is_low_rank`)
        return torch.addmm(param.detach(), b, a, alpha=factors.scale)

    def _add(self, ps: _Pass, name: str, acc, theta) -> None:
        """`acc`: the candidate's Fisher sum over its examples (a tensor, or for an untouched tensor a
        `_SquaredTotal`); `theta()`: its tensor, asked for only where the fold needs it."""
        n = max(ps.examples, 1)
        if isinstance(acc, _SquaredTotal):
            ps.total += acc.total / n
            return
        summed = total(acc) / n  # acc >= 0: a NaN/inf entry makes this sum NaN/inf
        if not math.isfinite(summed):
            check_finite(f"Fisher of candidate {ps.run.candidate.label}", name, acc)
        ps.total += summed
        if name not in self.untouched:
            with self._timed("fold_s"):
                # the accumulator is not used again: the fold scales it in place
                self.fold.add(ps.run.candidate.label, name, acc, theta(), ps.run.weight, 1.0 / n)

    def _top(self, ps: _Pass) -> None:
        fisher = ps.fisher
        with fisher._outer_phase() as outer:
            acc = {n: self._accumulator(n, q) for n, q in outer.items()}
            # an example that predicts nothing is no example: its checkpoints go with `terms`
            ps.live, ps.terms = [t for t in ps.terms if fisher._top_terms(t, outer, acc)], []
            ps.examples, ps.n_terms = len(ps.live), sum(len(t.weights) for t in ps.live)
            for n, a in acc.items():
                if outer[n] is fisher.input_embedding or not bool(a.any()):
                    if bool(a.any()):
                        ps.held[n] = a  # a tied embedding: its bottom path adds to it
                    continue  # the bottom path (the embeddings) finishes it
                self._add(ps, n, a, lambda n=n: self._theta(ps, n))
                ps.folded_top.add(n)

    def _bottom(self, ps: _Pass) -> None:
        fisher = ps.fisher
        with fisher._outer_phase() as outer:
            acc = {n: ps.held.pop(n) if n in ps.held else self._accumulator(n, q) for n, q in outer.items()}
            if ps.live:
                fisher._bottom_terms(ps.live, outer, acc)
            for n, a in acc.items():
                if n not in ps.folded_top:
                    self._add(ps, n, a, lambda n=n: self._theta(ps, n))
                elif bool(a.any()):
                    raise FwllmError(
                        f"fisher: {n} of {type(fisher.model).__name__} is used both before and after the "
                        "layer stack without being the tied input embedding (use gradient: full)"
                    )
        ps.live = []

    def _accumulator(self, name: str, like: torch.Tensor):
        """A Fisher sum for an outer tensor: its sum alone where no candidate changes it (a head or an
        embedding: no vocab x hidden float32 sum per candidate, and none in the fold)."""
        return _SquaredTotal() if name in self.untouched else torch.zeros_like(like)

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
