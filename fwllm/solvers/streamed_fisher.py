"""Fisher merging with a bounded memory (`gradient: layerwise`; causal LMs and encoders).

Each candidate runs as a meta skeleton (`fwllm.arch.streaming`) whose decoder layers are
materialised one at a time from its own shards (a LoRA candidate: the base's shards plus its
own delta, formed per tensor). Its diagonal Fisher is the in-RAM one of `fwllm.solvers.fisher`
exactly: per example (rows one at a time), sum over terms w (grad term)^2, each term's gradient
squared on its own. The layer-by-layer backward produces per-term weight gradients so:

  top       the head and loss on the stack's output give every term's d term / d h_L
            (and the gradients of the final norm and LM head, squared there);
  layers    from the top layer down, each layer is recomputed once per example from its
            checkpoint and backpropagated once per term (retaining the layer's graph), the
            weight gradient of each term squared and added, its input gradient carried down;
  bottom    the embeddings get each term's gradient from the stack input's. A tied LM head /
            embedding matrix gets the sum of both paths squared: the embedding path only
            touches the rows of the example's tokens, so the top path's gradient is kept on
            those rows only (tokens x hidden per term), never the whole matrix.

Cost: as the in-RAM exact Fisher (one backward per term: positions x top_k per example), plus
one recomputed forward per layer and example; host memory per example holds one hidden-state
gradient per term (terms x tokens x hidden floats).

`fisher_sums` is the candidate-major order, kept for what the layer-major one
(`fwllm.solvers.layer_major_fisher`, which reuses this class's per-layer steps) cannot do:
normalize_fisher, and per-candidate state too large for RAM. The candidate's Fisher accumulates
in a scratch sum (one model, float32, on disk); then it is folded into two running sums,
sum_i w_i F~_i theta_i and sum_i w_i F~_i with F~_i its Fisher (divided by its mean under
normalize_fisher) floored at epsilon, also on disk. Disk: 3 models'
float32 size whatever N; RAM: one layer (plus embeddings and head), one tensor at a time in
the fold. The merge is their ratio, per tensor. The sums are handed in (`FisherSums`): the method
makes them, in the plan folder, and reads the ratio back; this module writes no file itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Set, Tuple

import torch

from fwllm.arch.heads import is_head_tensor
from fwllm.arch.kinds import CAUSAL_MODEL, model_kind
from fwllm.arch.streaming import MetaModel, base_weights, skeleton
from fwllm.core.errors import FwllmError, check_finite
from fwllm.core.params import FisherParams
from fwllm.data.calibration import REGRESSION, CalibrationTask
from fwllm.data.encoding import encode_task
from fwllm.data.objective import Objective
from fwllm.data.positions import predicted_positions
from fwllm.io.candidates import Candidate
from fwllm.kernels.fisher import embedding_square_sum, linear_square_sum, prediction_terms
from fwllm.solvers.streamed_gradient import GIB, StreamedGradient

Add = Callable[[str, torch.Tensor], None]


def _zeros_if_none(g: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


class StreamedFisher(StreamedGradient):
    """The per-example diagonal Fisher of every parameter in `names`, handed to `add` one layer
    (and, at the end, the outer tensors) at a time; `measure(add)` returns (examples, terms)."""

    def __init__(
        self,
        meta: MetaModel,
        objective: Objective,
        p: FisherParams,
        names: Sequence[str],
        checkpoint_bytes: int = GIB,
    ):
        super().__init__(meta, objective, names, lambda: {}, checkpoint_bytes=checkpoint_bytes)
        self.p, self.kind = p, model_kind(self.model)
        # set once materialised: a fetch makes a new Parameter
        self.input_embedding: Optional[torch.nn.Parameter] = None
        self.tied_at_top: Set[str] = set()
        # outer tensors whose Fisher is wanted as a sum only (`add_(sum, alpha)` accumulators): a linear
        # weight's (a head) or an embedding's from its module's inputs and output gradients, no gradient
        self.sums_only: Set[str] = set()

    def measure(self, add: Add) -> Tuple[int, int]:
        examples = terms = 0
        groups = self._groups(self.objective)
        self.groups_last = len(groups)
        with self._outer_phase() as outer:
            acc = {n: torch.zeros_like(q) for n, q in outer.items()}
            for group in groups:
                for t in group:
                    self._capture(t)
                self._forward_stack(group, keep=True)
                live = [t for t in group if self._top_terms(t, outer, acc)]  # an example predicts something
                examples += len(live)
                terms += sum(len(t.weights) for t in live)
                if live:
                    self._backward_terms(live, add)
                    self._bottom_terms(live, outer, acc)
                for t in group:
                    t.calls, t.inputs, t.grads = [], [], []
            for n in self.outer_trainable:
                add(n, acc[n])
        return examples, terms

    @contextlib.contextmanager
    def _outer_phase(self) -> Iterator[Dict[str, torch.nn.Parameter]]:
        """The tensors outside the stack materialised for a phase: {name: parameter}."""
        with self._streamed_outer():
            outer = {n: self.model.get_parameter(n) for n in self.outer_trainable}
            embeddings = self.model.get_input_embeddings()
            self.input_embedding = embeddings.weight if isinstance(embeddings, torch.nn.Embedding) else None
            self._check_ties(outer)
            try:
                yield outer
            finally:
                # the materialised embedding must not outlive its phase: the layer-major order keeps a
                # StreamedFisher per candidate, and each would pin a vocab x hidden float32 copy
                self.input_embedding = None

    def _check_ties(self, outer: Dict[str, torch.nn.Parameter]) -> None:
        # another tie is one parameter the top reaches whole (RoBERTa's LM-head bias and its decoder's):
        # its summed gradient is right there, unless the bottom reaches it too (`_bottom_terms` refuses)
        self.tied_at_top = {
            n for n, q in outer.items() if len(self.meta.group(n)) > 1 and q is not self.input_embedding
        }

    def _top_terms(self, t, outer: Dict[str, torch.nn.Parameter], acc: Dict[str, torch.Tensor]) -> bool:
        """Each term's gradient at the stack output (kept per term) and at the head (squared)."""
        if t.task.kind == REGRESSION:
            raise FwllmError(
                "fisher: gradient: layerwise does not cover regression rows (use gradient: full)"
            )
        top = t.hidden.to(self.meta.device).requires_grad_(True)
        t.hidden = None
        last = len(self.layers) - 1
        stack_output = lambda i: lambda hidden, *a, **k: top if i == last else hidden  # noqa: E731
        hooked = self._sum_only_modules(outer, torch.nn.Linear)
        with self._layers_as(stack_output), torch.enable_grad(), _calls_of(hooked) as calls:
            logits = self.model(**{k: v for k, v in t.batch.items() if k != "labels"}).logits
            pos, targets = predicted_positions(logits, t.batch, t.task.kind, self.kind)
            if pos.shape[0] == 0:
                return False  # e.g. a response truncated away: nothing predicted, not an example
            terms = prediction_terms(pos, targets, self.p.fisher, 0 if logits.dim() == 2 else self.p.top_k)
        ids = t.batch["input_ids"].flatten().unique()
        names = [n for n in outer if n not in hooked]
        outputs = [y for n in hooked for _, y in calls[n]]
        params = [top] + [outer[n] for n in names] + outputs
        t.grads, t.weights, t.rows = [], [], {n: [] for n in names}
        for j, (value, w) in enumerate(terms):
            grads = torch.autograd.grad(value, params, retain_graph=j < len(terms) - 1, allow_unused=True)
            t.grads.append(_zeros_if_none(grads[0], top).to(self.host))
            t.weights.append(w)
            _add_sums(
                hooked, calls, grads[1 + len(names) :], acc, w, lambda x, dy, module: linear_square_sum(x, dy)
            )
            for n, g in zip(names, grads[1 : 1 + len(names)]):
                if g is None:
                    continue
                if outer[n] is self.input_embedding:  # the bottom path adds to these rows: square them there
                    t.rows[n].append(g[ids].clone())
                    g = g.clone()
                    g[ids] = 0
                acc[n].add_(g.square(), alpha=w)
        t.ids = ids
        return True

    def _backward_terms(self, terms: Sequence, add: Add) -> None:
        for i in reversed(range(len(self.layers))):
            self._backward_layer(i, terms, add)

    def _backward_layer(self, i: int, terms: Sequence, add: Add) -> None:
        """Layer i of the backward: its Fisher over `terms` to `add` (called while the layer is
        materialised), each term's input gradient carried down in place of its output's."""
        device = self.meta.device
        self._fetch_layer(i)
        try:
            names = [n for n in self.layer_params[i] if n in self.blocks]
            params = [self.model.get_parameter(n) for n in names]
            acc = [torch.zeros_like(q) for q in params]
            for t in terms:
                x = t.inputs[i].to(device).requires_grad_(True)
                args, kwargs = t.calls[i]
                with torch.enable_grad():
                    out = self._forwards[i](x, *args, **kwargs)
                for j, w in enumerate(t.weights):
                    grads = torch.autograd.grad(
                        out,
                        [x] + params,
                        grad_outputs=t.grads[j].to(device),
                        retain_graph=j < len(t.weights) - 1,
                        allow_unused=True,
                    )
                    t.grads[j] = _zeros_if_none(grads[0], x).to(self.host)
                    for a, g in zip(acc, grads[1:]):
                        if g is not None:
                            a.add_(g.square(), alpha=w)
                t.inputs[i] = None
            for n, a in zip(names, acc):
                add(n, a)
        finally:
            self.meta.release(self.layer_params[i])

    def _bottom_terms(
        self, terms: Sequence, outer: Dict[str, torch.nn.Parameter], acc: Dict[str, torch.Tensor]
    ) -> None:
        hooked = self._sum_only_modules(outer, torch.nn.Embedding)
        names = [n for n in outer if n not in hooked]
        for t in terms:
            with _calls_of(hooked) as calls:
                start = self._capture(t, keep_graph=True)
            outputs = [y for n in hooked for _, y in calls[n]]
            grads_of = [[None] * (len(names) + len(outputs))] * len(t.weights)
            if start.requires_grad and (names or outputs):
                grads_of, m, params = [], len(t.weights), [outer[n] for n in names] + outputs
                for j in range(m):
                    grads_of.append(
                        torch.autograd.grad(
                            start,
                            params,
                            t.grads[j].to(start.device),
                            retain_graph=j < m - 1,
                            allow_unused=True,
                        )
                    )
            for j, (w, grads) in enumerate(zip(t.weights, grads_of)):
                _add_sums(hooked, calls, grads[len(names) :], acc, w, _embedding_sum)
                for n, g in zip(names, grads):
                    if outer[n] is self.input_embedding and t.rows[n]:
                        rows = t.rows[n][j] + (0 if g is None else g[t.ids])
                        acc[n][t.ids] += w * rows.square()
                    elif g is not None:
                        if n in self.tied_at_top:  # two paths' gradients, each squared alone: wrong
                            raise FwllmError(
                                f"fisher: gradient: layerwise handles a tied input embedding only; {n} "
                                f"is tied otherwise in {type(self.model).__name__} (use gradient: full)"
                            )
                        acc[n].add_(g.square(), alpha=w)

    def _sum_only_modules(self, outer: Dict[str, torch.nn.Parameter], kind: type) -> Dict:
        """{name: module} of the `sums_only` tensors that are the weight of a `kind` module (not tied)."""
        out = {}
        for n in outer:
            module_name, _, attr = n.rpartition(".")
            module = self.model.get_submodule(module_name) if module_name else self.model
            single = len(self.meta.group(n)) == 1
            if n in self.sums_only and attr == "weight" and type(module) is kind and single:
                out[n] = module
        return out


@contextlib.contextmanager
def _calls_of(modules: Dict[str, torch.nn.Module]) -> Iterator[Dict[str, List[Tuple]]]:
    """Within the block, each call of each module recorded as (its input, its output)."""
    calls: Dict[str, List[Tuple]] = {n: [] for n in modules}

    def record(name):
        return lambda module, args, out: calls[name].append((args[0].detach(), out))

    handles = [m.register_forward_hook(record(n)) for n, m in modules.items()]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _add_sums(hooked, calls, grads, acc, w: float, square_sum) -> None:
    """Adds w * sum(G^2) of each hooked module's weight gradient G, from its calls' inputs and output
    gradients (the calls' gradients add before squaring: their rows are concatenated)."""
    grads = iter(grads)
    for n in hooked:
        xs, gs = [], []
        for x, y in calls[n]:
            g = next(grads)
            if g is not None:
                xs.append(x)
                gs.append(g.reshape(-1, g.shape[-1]))
        if gs:
            # a linear's inputs keep their feature axis, an embedding's token ids are flat
            rows = [x.reshape(-1, x.shape[-1]) if x.is_floating_point() else x.reshape(-1) for x in xs]
            acc[n].add_(square_sum(torch.cat(rows), torch.cat(gs), hooked[n]), alpha=w)


def _embedding_sum(ids: torch.Tensor, de: torch.Tensor, module: torch.nn.Embedding) -> torch.Tensor:
    return embedding_square_sum(ids, de, module.padding_idx)


class CandidateWeights(Mapping):
    """A LoRA candidate's tensors: the base's, plus its own delta where it has one (per tensor)."""

    def __init__(self, base: Mapping[str, torch.Tensor], candidate: Candidate):
        self.base, self.candidate = base, candidate

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.candidate.tensor(name, self.base[name].to(torch.float32))

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


class RunningSum(Protocol):
    """A model-sized float32 sum: `add(name, x)` adds x into that tensor's entry; `read(name)` is
    the entry (zeros before the first add). The method makes them (on disk, in the plan folder)."""

    def add(self, name: str, value: torch.Tensor) -> None: ...

    def read(self, name: str) -> torch.Tensor: ...


@dataclass
class FisherSums:
    """Where the layerwise Fisher accumulates, handed in by the method: the two running sums, and
    a fresh scratch sum per candidate (a new one replaces the last candidate's)."""

    num: RunningSum  # sum_i w_i F~_i theta_i
    den: RunningSum  # sum_i w_i F~_i
    scratch: Callable[[], RunningSum]


@dataclass
class CandidateRun:
    candidate: Candidate
    task: CalibrationTask
    model_dir: str  # the checkpoint its skeleton and shards come from (the base, for an adapter)
    weight: float


def causal_skeleton(run: "CandidateRun") -> Tuple[torch.nn.Module, str]:
    """The candidate's meta skeleton and its kind; the layerwise Fisher covers causal LMs only."""
    model = skeleton(run.model_dir)
    kind = model_kind(model)
    if kind != CAUSAL_MODEL:
        raise FwllmError(
            f"fisher: gradient: layerwise covers causal LMs only; {run.candidate.label} is "
            f"{type(model).__name__} (use gradient: full)"
        )
    return model, kind


def fisher_sums(
    base_dir: str,
    runs: Sequence[CandidateRun],
    covered: Dict[str, Tuple[int, ...]],
    tokenizer,
    p: FisherParams,
    device: str,
    sums: FisherSums,
) -> List[dict]:
    """Add sum_i w_i F~_i theta_i and sum_i w_i F~_i over the `covered` parameters (name -> shape,
    `covered_parameters`) into `sums`; return each candidate's meta (examples, terms, mean) as the
    in-RAM path reports it."""
    names = list(covered)
    numel = sum(int(torch.Size(s).numel()) for s in covered.values())
    base_map = base_weights(base_dir)
    metas = []
    for run in runs:
        torch.manual_seed(p.seed)
        scratch = sums.scratch()
        own = base_weights(run.model_dir)
        weights = own if run.candidate.adapter is None else CandidateWeights(own, run.candidate)
        model = skeleton(run.model_dir)  # (any kind: the layer-major order alone is causal-only)
        kind = model_kind(model)
        objective = Objective([encode_task(run.task, tokenizer, p.max_length, batch_size=1, model_kind=kind)])
        meta = MetaModel(model, weights, device, trainable=names)
        examples, terms = StreamedFisher(meta, objective, p, names).measure(scratch.add)
        n = max(examples, 1)
        total = sum(float((scratch.read(x) / n).double().sum()) for x in names)
        mean = total / max(numel, 1)
        scale = (mean or 1.0) if p.normalize_fisher else 1.0
        for x in names:  # the fold: one tensor of the candidate at a time
            f = scratch.read(x) / n
            check_finite(f"Fisher of candidate {run.candidate.label}", x, f)
            f = (f / scale).float().clamp_min(p.epsilon) * run.weight
            # a full checkpoint's tensor is its own; an adapter's is the base's plus its delta
            base = base_map[x].to(torch.float32) if run.candidate.adapter is not None else None
            theta = run.candidate.tensor(x, base)
            sums.num.add(x, f * theta.float())
            sums.den.add(x, f)
        metas.append(
            {
                "examples": examples,
                "terms": terms,
                "mean": mean,
                "gradient": "layerwise",
                "layer_fetches": meta.fetches,
                "peak_resident_bytes": meta.peak_resident_bytes,
            }
        )
        del scratch, meta, model
    return metas


def covered_parameters(base_dir: str, architecture: Optional[str] = None) -> Dict[str, Tuple[int, ...]]:
    """The parameters the Fisher covers (float, not task heads; tied duplicates once), in the
    model's order (class `architecture`: an encoder pool's classifier), with their shapes."""
    model = skeleton(base_dir, architecture)
    return {
        n: tuple(q.shape)
        for n, q in model.named_parameters()
        if q.is_floating_point() and not is_head_tensor(n)
    }
