"""RegMean on the bounded path: Grams measured layer by layer and reduced as they come.

The model is the meta-device skeleton of `fwllm.arch.streaming`; one decoder layer is
materialised at a time. A full candidate's layer is read from its own shards; a LoRA
candidate runs as the base layer plus its own factors (forward hooks adding s (x A^T) B^T),
never merged into a model. Work is layer-major:

  A. capture  each candidate's micro-batches run up to the layer stack (its own embeddings),
              recording every layer's other arguments (masks, rotary embeddings); the stack
              input is kept on the host, on the candidate's calibration rows (file-backed
              in the plan folder when a `spill_dir` is given, as a method's solve does);
  B. layers   for each layer, each candidate in turn: materialise its layer (a pure LoRA pool
              reads the base layer once for all of them), run its micro-batches with hooks on
              the layer's linear maps, add its activation rows per layer input to `RegMeanSums`
              (its Gram once the rows outgrow what the sums keep as rows), drop them; then solve
              the layer and hand its merged weights on;
  C. top      each candidate replays the model from its stack output (norm, LM head), so the
              linear maps outside the stack get their Grams the same way;
  D. rest     every other tensor (embeddings, norms, biases) is the weighted average, read
              one candidate tensor at a time.

Weights that read one input (q/k/v; gate/up) are found by the identity of the tensor their
pre-hooks see, and share one Gram. Nothing the size of a model, and no per-candidate Gram,
is ever kept: per layer input, S = sum_i c_i G~_i (or, with few calibration tokens, the rows
it is made of: forming x^T x costs as much as the forward), and per weight its numerator.
"""

from __future__ import annotations

import contextlib
import time
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch

from fwllm.arch.heads import is_head_tensor
from fwllm.arch.layer_stack import layer_stack
from fwllm.arch.streaming import MetaModel, base_weights, fetched_around_forward, forwards_replaced, skeleton
from fwllm.arch.weight_layout import input_features, transposed_weights
from fwllm.core.errors import FwllmError, check_finite, check_finite_gram
from fwllm.core.memory import map_large_allocations, return_free_memory
from fwllm.io.candidates import Candidate
from fwllm.io.spill import FileSpill
from fwllm.io.tensors import TensorReader
from fwllm.kernels.low_rank import LowRank
from fwllm.kernels.regmean_reduced import RegMeanSums, add_lower_product, symmetrize_
from fwllm.kernels.weighted_sum import weighted_average
from fwllm.solvers.grams import linear_layers
from fwllm.solvers.lora_terms import low_rank_candidate

LOG = logging.getLogger(__name__)
SCRATCH_DIR = ".regmean_scratch"  # a plan folder's spilled hidden states (file-backed, each unlinked)


@dataclass
class _Rows:
    """One candidate's rows [T, in] of one layer input (real tokens only), kept instead of its Gram
    while they fit in `room`: the rows its sums still keep as rows (`RegMeanSums.rows_room`)."""

    room: int
    blocks: List[torch.Tensor] = field(default_factory=list)
    count: int = 0


def add_statistics(sums: RegMeanSums, stats: Any, taus: Mapping, weight: float) -> None:
    """One candidate's statistics of one input into its sums: its rows (a _Rows) or its Gram."""
    if isinstance(stats, _Rows):
        # one block (as checked) is handed on as is: sums of one input with other weights share it
        rows = stats.blocks[0] if len(stats.blocks) == 1 else torch.cat(stats.blocks)
        sums.add_rows(rows, taus, weight)
    else:
        sums.add(stats, taus, weight)


class _Captured(Exception):
    """Raised by the last pass-through layer: the rest of the forward is not needed."""


class _ReaderWeights(Mapping):
    """A full candidate's tensors by name, read from its shards on each access (a MetaModel source)."""

    def __init__(self, reader: TensorReader):
        self.reader = reader

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def __contains__(self, name) -> bool:
        return name in self.reader

    def __iter__(self):
        return iter(self.reader.names())

    def __len__(self) -> int:
        return len(self.reader.names())


@dataclass
class _Run:
    """One candidate's pass: its micro-batches, each one's layer arguments and current hidden state."""

    cand: Candidate
    weight: float
    batches: List[Dict[str, torch.Tensor]]
    calls: List[Tuple[tuple, dict]] = field(default_factory=list)  # per micro-batch (same for every layer)
    hidden: List[Optional[torch.Tensor]] = field(default_factory=list)  # per micro-batch, on the host
    tokens: int = 0

    @property
    def source(self) -> Optional[Mapping]:
        """Where this candidate's weights come from (None: the base's shards)."""
        return None if self.cand.adapter is not None else _ReaderWeights(self.cand.reader)


def check_streamable(candidates: Sequence[Candidate], method: str) -> None:
    """Full checkpoints and plain LoRA adapters only: a DoRA adapter, saved full modules or
    transposed factors cannot run as base layer + low-rank term."""
    for c in candidates:
        a = c.adapter
        if a is None:
            continue
        if a.full or not all(low_rank_candidate(a, n) for n in a.factors):
            raise FwllmError(
                f"{method}: gradient: layerwise runs plain LoRA adapters only; {c.label} has "
                "DoRA, modules_to_save or transposed factors (use gradient: full)"
            )


class StreamedRegMean:
    """`merged()` yields (name, merged tensor) for every tensor of the base the candidates share
    (with `keep_factors`, a pure LoRA pool's: (name, LowRank delta) for the weights it adapts)."""

    def __init__(
        self,
        base_dir: str,
        runs: Sequence[_Run],
        alpha: float,
        ridge: float,
        device: str = "cpu",
        architecture: Optional[str] = None,
        host: str = "cpu",
        on_gram: Optional[Callable[[str, str, torch.Tensor], None]] = None,
        spill_dir: Optional[str] = None,
    ):
        # every candidate's hidden states, from one layer to the next, in file-backed pages there
        # (`fwllm.io.spill`): in anonymous memory they grow with N (16 x 2048 tokens at 1.1B: 0.27 GB)
        self.spill = FileSpill(spill_dir) if spill_dir is not None else None
        self.on_gram = on_gram  # (label, weight name, Gram): an observer (tests, diagnostics); keeps nothing
        self.base_dir, self.runs, self.alpha, self.ridge = base_dir, list(runs), alpha, ridge
        self.device, self.host = torch.device(device), torch.device(host)
        self.model = skeleton(base_dir, architecture)
        self.base_map = base_weights(base_dir)
        self.meta = MetaModel(self.model, self.base_map, device, optional=is_head_tensor)
        self.stack_name, self.layers = layer_stack(self.model)
        self.layer_params = [
            self.meta.module_parameters(f"{self.stack_name}.{i}") for i in range(len(self.layers))
        ]
        in_stack = {n for names in self.layer_params for n in names}
        self.linear = linear_layers(self.model)
        self.transposed = transposed_weights(self.model)
        # a task head (an encoder pool's classifier) is each task's own, never merged: no Gram for it
        self.outer_linear = {
            n: m for n, m in self.linear.items() if n not in in_stack and not is_head_tensor(n)
        }
        self.outer = self._outer_modules(in_stack)
        self._forwards = [layer.forward for layer in self.layers]
        # a pure LoRA pool merges in task-vector space, keeping each candidate's factors; else in weight space
        self.low_rank = all(r.cand.adapter is not None for r in self.runs)
        # `merged()` of a pure LoRA pool yields each solved weight as its LowRank delta (not W_0 + B A),
        # and skips the tensors no adapter touches (the merge leaves them at the base)
        self.keep_factors = False
        self.solved: Set[str] = set()
        self.lambdas: Dict[str, float] = {}
        # seconds in the closed form (kept rows folded, factorisations, solves): the rest is the Gram pass
        self.closed_form_s = 0.0

    @classmethod
    def for_candidates(
        cls,
        base_dir: str,
        candidates: Sequence[Candidate],
        weights: Sequence[float],
        batches: Sequence[List[Dict[str, torch.Tensor]]],
        alpha: float,
        ridge: float,
        device: str = "cpu",
        **kw,
    ) -> "StreamedRegMean":
        runs = [
            _Run(c, float(w), [{k: v for k, v in b.items() if k != "labels"} for b in bs])
            for c, w, bs in zip(candidates, weights, batches)
        ]
        return cls(base_dir, runs, alpha, ridge, device, **kw)

    # -- the model around the stack ---------------------------------------------------------
    def _outer_modules(self, in_stack: Set[str]) -> List[Tuple[torch.nn.Module, List[str]]]:
        out = []
        for prefix, module in self.model.named_modules():
            names = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
            names = [n for n in names if n not in in_stack]
            if names:
                out.append((module, names))
        return out

    def _streamed_outer(self, source: Optional[Mapping]):
        """Modules outside the stack fetch their weights (the candidate's) at their first forward, and
        keep them until the block ends."""
        return fetched_around_forward(self.meta, self.outer, source, hold=True)

    def _by_source(self) -> Iterator[Tuple[Optional[Mapping], List[_Run]]]:
        """The runs in order, grouped by where their weights outside the stack come from: consecutive
        LoRA candidates share the base's (a LoRA pool: one group), a full candidate has its own."""
        group: List[_Run] = []
        for run in self.runs:
            if run.cand.adapter is not None:
                group.append(run)
                continue
            if group:
                yield None, group
                group = []
            yield run.source, [run]
        if group:
            yield None, group

    def _runs_with_outer(self) -> Iterator[_Run]:
        """Each run, inside the block that holds its weights outside the stack (one per `_by_source`
        group: consume it whole)."""
        for source, runs in self._by_source():
            with self._streamed_outer(source):
                yield from runs

    def _layers_as(self, make: Callable[[int], Callable]):
        return forwards_replaced(self.layers, make)

    @contextlib.contextmanager
    def _lora(self, run: _Run, names: Sequence[str]):
        """The candidate's low-rank terms on the linear maps of `names` it adapts: y += s (x A^T) B^T."""
        handles = []
        adapter = run.cand.adapter
        if adapter is not None:
            for name in names:
                f = adapter.factors.get(name)
                if f is None:
                    continue
                module = self.model.get_submodule(name.rsplit(".", 1)[0])

                def hook(mod, args, out, f=f):
                    x = args[0]
                    return out + ((x @ f.a.to(x.device, x.dtype).T) @ f.b.to(x.device, x.dtype).T) * f.scale

                handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def _grams(
        self,
        names: Sequence[str],
        grams: Dict[str, torch.Tensor],
        leader: Dict[str, str],
        state: Dict[str, Any],
        spare: Optional[Dict[str, torch.Tensor]] = None,
        room: Optional[Callable[[str, int], int]] = None,
    ):
        """Pre-hooks keeping the rows x over real tokens in `grams` (a _Rows) while they fit in
        `room(name, in)` rows, else adding x x^T to a Gram there (its lower triangle: `_checked`
        mirrors it); weights whose module sees the very tensor another one saw in this forward share
        that one's entry (`leader`). A Gram starts from
        the previous candidate's buffer in `spare` when there is one: a fresh [in, in] allocation per
        candidate and layer input is page-faulted in anew each time (at 1.1B, seconds per layer)."""
        spare = {} if spare is None else spare

        def new_gram(name: str, features: int, device: torch.device) -> torch.Tensor:
            reused = spare.pop(name, None)
            return reused.zero_() if reused is not None else torch.zeros(features, features, device=device)

        handles = []
        for name in names:
            module = self.linear[name]

            def hook(mod, args, name=name):
                x = args[0]
                for other, seen in state["seen"]:
                    if seen is x:
                        if leader.setdefault(name, other) != other:
                            raise FwllmError(f"regmean: the inputs of {name} changed between micro-batches")
                        return
                if leader.setdefault(name, name) != name:
                    raise FwllmError(f"regmean: the inputs of {name} changed between micro-batches")
                state["seen"].append((name, x))
                mask = state["mask"]
                if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                    x = x[mask]  # padding is not data the layer has to fit
                x = x.reshape(-1, x.shape[-1]).float()
                entry = grams.get(name)
                if entry is None:
                    features = input_features(mod)
                    left = room(name, features) if room is not None and self._rows_fit(features) else 0
                    entry = grams[name] = _Rows(left) if left > 0 else new_gram(name, features, x.device)
                if isinstance(entry, _Rows):
                    if entry.count + x.shape[0] <= entry.room:
                        # kept past this forward: a copy, never a view of the layer's own activations
                        entry.blocks.append(x.clone() if x.data_ptr() == args[0].data_ptr() else x)
                        entry.count += x.shape[0]
                        return
                    gram = grams[name] = new_gram(name, x.shape[-1], x.device)  # more rows than kept
                    for block in entry.blocks:
                        add_lower_product(gram, block)
                    entry = gram
                # the lower triangle only (about half the products), mirrored once the Gram is whole
                add_lower_product(entry, x)

            handles.append(module.register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _each_batch(self, run: _Run, state: Dict[str, Any]):
        for k, batch in enumerate(run.batches):
            mask = batch.get("attention_mask")
            state["mask"] = mask.to(self.device).bool() if mask is not None else None
            state["seen"] = []
            yield k, {key: v.to(self.device) for key, v in batch.items()}
        state["seen"] = []

    # -- phases ------------------------------------------------------------------------------
    def _capture(self, run: _Run) -> None:
        """Phase A: the stack input and every layer's other arguments, per micro-batch (within
        `_streamed_outer` of the run's source)."""
        last = len(self.layers) - 1
        run.calls, run.hidden, run.tokens = [], [], 0
        state: Dict[str, Any] = {"mask": None, "seen": []}
        for _, batch in self._each_batch(run, state):
            seen: Dict[str, Any] = {}

            def passthrough(i):
                def forward(hidden, *args, **kwargs):
                    if i == 0:
                        seen["input"], seen["call"] = hidden, (args, kwargs)
                    elif hidden is not seen["out"]:
                        raise FwllmError(
                            f"regmean: gradient: layerwise needs layer {i} to take layer "
                            f"{i - 1}'s output directly; {type(self.model).__name__} does not "
                            "(use gradient: full)"
                        )
                    seen["out"] = hidden
                    if i == last:
                        raise _Captured
                    return hidden

                return forward

            with self._layers_as(passthrough), self._lora(run, self.outer_linear), torch.no_grad():
                try:
                    self.model(**batch)
                except _Captured:
                    pass
            if "input" not in seen:
                raise FwllmError(f"{type(self.model).__name__}'s forward never reached its layer stack")
            run.calls.append(seen["call"])
            run.hidden.append(self._held(seen["input"].detach()))
            mask = batch.get("attention_mask")
            run.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    def _held(self, hidden: torch.Tensor, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A hidden state kept until the next layer: on the host, file-backed where spilled. A layer's
        output is written over its input's spilled pages (`into`, read by then): a fresh mapping per
        layer faulted in and wrote back every page anew (at 1.1B with 2048 tokens per candidate, ~25 s
        of a Gram pass and 10 GB written)."""
        hidden = hidden.to(self.host)
        if self.spill is None:
            return hidden
        if into is not None and into.shape == hidden.shape and into.dtype == hidden.dtype:
            return into.copy_(hidden)
        return self.spill(hidden)

    def held_bytes(self, batches: Sequence[Sequence[Dict[str, torch.Tensor]]]) -> int:
        """The spilled hidden states' bytes for these micro-batches (float32, padded tokens)."""
        width = int(getattr(self.model.config, "hidden_size", 0))
        return 4 * width * sum(int(b["input_ids"].numel()) for bs in batches for b in bs)

    def _layer(self, i: int) -> Iterator[Tuple[str, torch.Tensor]]:
        """Phase B for layer i: every candidate through it, its Grams reduced, the layer solved."""
        names = self.layer_params[i]
        linear = [n for n in names if n in self.linear]
        sums: Dict[str, RegMeanSums] = {}
        spare: Dict[str, torch.Tensor] = {}
        resident_source: Any = False  # which weights the layer holds now (False: none)
        try:
            for run in self.runs:
                source = run.source
                if resident_source is False or source is not None or resident_source is not None:
                    self.meta.release(names)
                    self.meta.fetch(names, source)
                    resident_source = source
                grams: Dict[str, torch.Tensor] = {}
                leader: Dict[str, str] = {}
                state: Dict[str, Any] = {}
                with (
                    self._lora(run, linear),
                    self._grams(linear, grams, leader, state, spare, self._room(sums)),
                    torch.no_grad(),
                ):
                    for k, batch in self._each_batch(run, state):
                        args, kwargs = run.calls[k]
                        out = self._forwards[i](run.hidden[k].to(self.device), *args, **kwargs)
                        if not isinstance(out, torch.Tensor):
                            raise FwllmError(
                                "regmean: gradient: layerwise expects layers that return one "
                                f"tensor, got {type(out).__name__} (use gradient: full)"
                            )
                        run.hidden[k] = self._held(out, into=run.hidden[k])
                self._add(run, grams, leader, sums)
                # the sums keep no reference to a candidate's Gram (its rows, they do keep)
                spare.update((n, g) for n, g in grams.items() if isinstance(g, torch.Tensor))
                del grams
            spare.clear()
            yield from self._solve(sums)
        finally:
            self.meta.release(names)

    def _top(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Phase C: each candidate's stack output through the rest of the model (norm, head)."""
        names = list(self.outer_linear)
        sums: Dict[str, RegMeanSums] = {}
        last = len(self.layers) - 1
        for run in self._runs_with_outer() if names else ():  # (a classifier's head: all there is)
            self._top_run(run, names, sums, last)
        yield from self._solve(sums)

    def _top_run(self, run: _Run, names: List[str], sums: Dict[str, RegMeanSums], last: int) -> None:
        grams: Dict[str, torch.Tensor] = {}
        leader: Dict[str, str] = {}
        state: Dict[str, Any] = {}
        for k, batch in self._each_batch(run, state):
            top = run.hidden[k].to(self.device)
            with (
                self._layers_as(lambda j: lambda hidden, *a, **kw: top if j == last else hidden),
                self._lora(run, names),
                self._grams(names, grams, leader, state, room=self._room(sums)),
                torch.no_grad(),
            ):
                self.model(**batch)
        run.hidden = []
        self._add(run, grams, leader, sums)

    # -- the reduction -----------------------------------------------------------------------
    def _weight_of(self, run: _Run, name: str) -> Optional[Any]:
        """What the sums take for one weight of this candidate: its task vector as a LowRank (pure
        LoRA pools), else its weight [out, in] (the live parameter, or read when not resident)."""
        adapter = run.cand.adapter
        if self.low_rank:
            f = adapter.factors.get(name)
            return None if f is None else LowRank(f.a.float(), f.b.float(), f.scale)
        if name in self.meta.resident:
            w = self.model.get_parameter(name).detach().float()
        else:
            w = (run.source or self.base_map)[name].float()
        if adapter is not None and name in adapter.factors:
            w = w + adapter.factors[name].low_rank_delta()
        check_finite(f"weights of candidate {run.cand.label}", name, w)
        return w.T if name in self.transposed else w

    def _rows_fit(self, features: int) -> bool:
        """Whether all candidates' tokens fit in the rows the sums of an input this wide keep. Where
        they do not, the sums would turn dense part way, folding the rows kept so far in float64 (twice
        a float32 Gram's time): they are dense from the start."""
        return sum(run.tokens for run in self.runs) <= RegMeanSums.row_limit(features)

    def _room(self, sums: Dict[Any, RegMeanSums]) -> Callable[[str, int], int]:
        """room(input name, in): how many rows of the next candidate its sums still keep as rows."""

        def room(name: str, features: int) -> int:
            s = sums.get(name)
            return RegMeanSums.row_limit(features) if s is None else s.rows_room(features)

        return room

    def _checked(self, run: _Run, name: str, stats: Any) -> Any:
        """A candidate's rows (a _Rows, as one block) or Gram of one input, checked finite, shown to
        `on_gram`, on the host."""
        what = f"Gram of candidate {run.cand.label}"
        if isinstance(stats, _Rows):
            rows = torch.cat(stats.blocks)
            check_finite(what, name, rows.sum(0))  # a NaN/inf entry reaches its column's sum
            if self.on_gram is not None:
                self.on_gram(run.cand.label, name, rows.T @ rows)  # formed only for the observer
            return _Rows(stats.room, [rows.to(self.host)], stats.count)
        # formed as its lower triangle (`_grams`): the sums mirror it where they need it whole
        check_finite_gram(what, name, stats)
        if self.on_gram is not None:
            self.on_gram(run.cand.label, name, symmetrize_(stats.clone()))  # the buffer is the next one's
        return stats.to(self.host)

    def _add(
        self, run: _Run, grams: Dict[str, Any], leader: Dict[str, str], sums: Dict[str, RegMeanSums]
    ) -> None:
        for name, stats in grams.items():
            stats = self._checked(run, name, stats)
            group = [n for n, lead in leader.items() if lead == name]
            taus = {n: self._weight_of(run, n) for n in group}
            add_statistics(sums.setdefault(name, RegMeanSums(self.alpha)), stats, taus, run.weight)

    def _solve(self, sums: Dict[str, RegMeanSums]) -> Iterator[Tuple[str, torch.Tensor]]:
        for group in list(sums):
            s = sums.pop(group)  # freed once solved: the next input's factorisation does not sit on it
            start = time.perf_counter()
            deltas, lam = s.solve(self.ridge)
            del s
            self.closed_form_s += time.perf_counter() - start
            if lam == float("inf"):
                LOG.warning("regmean: %s saw no input on any candidate; using the weighted average", group)
            elif lam:
                LOG.warning(
                    "regmean: the Gram sum of %s is singular; added ridge %.3g*I (unseen input "
                    "directions keep the weighted average)",
                    group,
                    lam,
                )
            for name, value in deltas.items():
                if self.low_rank and self.keep_factors and isinstance(value, LowRank):
                    # W_0 + B A kept as its factors (a Conv1D weight [in, out]: (B A)^T = A^T B^T)
                    if name in self.transposed:
                        value = LowRank(value.b.T.contiguous(), value.a.T.contiguous(), value.scale)
                    self.lambdas[name] = lam
                    self.solved.add(name)
                    yield name, value
                    continue
                if self.low_rank:
                    base = self._base(name)
                    delta = value.dense() if isinstance(value, LowRank) else value
                    merged = base + (delta.T if name in self.transposed else delta)
                else:
                    merged = value.T.contiguous() if name in self.transposed else value
                self.lambdas[name] = lam
                self.solved.add(name)
                yield name, merged.float()
        sums.clear()

    def _base(self, name: str) -> torch.Tensor:
        if name in self.meta.resident:
            return self.model.get_parameter(name).detach().float().clone()
        return self.base_map[name].float()

    # -- the whole merge ---------------------------------------------------------------------
    def merged(self) -> Iterator[Tuple[str, torch.Tensor]]:
        map_large_allocations()  # a freed activation or Gram handed back, not kept in the heap
        try:
            for run in self._runs_with_outer():
                self._capture(run)
            for i in range(len(self.layers)):
                yield from self._layer(i)
                return_free_memory()
            yield from self._top()
        finally:
            for run in self.runs:
                run.hidden, run.calls = [], []
        yield from self._rest()

    def _rest(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Phase D: every tensor not solved in closed form, the weighted average of the candidates'."""
        base = TensorReader(self.base_dir)
        full = [r.cand.reader for r in self.runs if r.cand.adapter is None]
        weights = [r.weight for r in self.runs]
        for name in base.names():
            if name in self.solved or not all(name in r for r in full):
                continue
            if (
                self.keep_factors
                and self.low_rank
                and not any(name in r.cand.adapter.factors for r in self.runs)
            ):
                continue  # every candidate is the base here
            b = base.get(name, dtype=None)
            if not b.is_floating_point() or is_head_tensor(name):
                yield name, b
                continue
            yield name, weighted_average((r.cand.tensor(name, b) for r in self.runs), weights).float()
