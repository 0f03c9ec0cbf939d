"""A picture of an FW solve: the objective per iteration, and which vertices the blocks chose.

Written as ``trace.png`` beside ``trace.json`` in the plan folder. The right panel answers
the question users ask of a pool with distractors: which candidates did FW actually use?
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from fwllm.io.plotting import pyplot

BASE = "base"


def vertex_shares(trace: Sequence[dict], labels: Sequence[str]) -> Dict[str, List[float]]:
    """Per vertex (the base and each candidate), the share of blocks stepping toward it at each
    iteration. A soft step over k vertices counts 1/k for each of them."""
    names = [BASE] + list(labels)
    shares = {name: [0.0] * len(trace) for name in names}
    for t, step in enumerate(trace):
        chosen = step["chosen"]
        for members in chosen.values():
            if not members:
                shares[BASE][t] += 1.0
            for i in members:
                shares[names[i + 1]][t] += 1.0 / len(members)
        blocks = max(len(chosen), 1)
        for name in names:
            shares[name][t] /= blocks
    return shares


def short_label(label: str) -> str:
    """The last path component of a candidate (of the adapter, for BASE+ADAPTER)."""
    tail = label.split("+")[-1].rstrip("/")
    return os.path.basename(tail) or tail


def plot_trace(
    trace: Sequence[dict],
    labels: Sequence[str],
    path: str,
    selected: Optional[int] = None,
    final_objective: Optional[float] = None,
    initial_objective: Optional[float] = None,
) -> str:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [step["iteration"] for step in trace]
    ys = [step["objective"] for step in trace]
    if trace and trace[0].get("minibatch"):
        # stochastic FW: the per-iteration values are minibatch estimates; only the start and
        # the last iterate were scored on the full objective, and the better one is returned
        left.plot(xs, ys, marker=".", color="tab:gray", label="minibatch estimate")
        left.plot(
            [0, len(trace)],
            [initial_objective, final_objective],
            marker="o",
            linestyle="none",
            label="full objective",
        )
        if selected is not None:
            pick, value = (0, initial_objective) if selected == 0 else (len(trace), final_objective)
            left.plot(
                [pick],
                [value],
                marker="*",
                markersize=14,
                color="tab:red",
                linestyle="none",
                label=f"returned (iterate {selected})",
            )
        left.legend(fontsize="small")
    else:
        if final_objective is not None:
            xs, ys = xs + [len(trace)], ys + [final_objective]
        left.plot(xs, ys, marker="o")
        if selected is not None and selected < len(ys):
            left.plot(
                [xs[selected]],
                [ys[selected]],
                marker="*",
                markersize=14,
                color="tab:red",
                linestyle="none",
                label=f"returned (iterate {selected})",
            )
            left.legend(fontsize="small")
    left.set_xlabel("iterate t")
    left.set_ylabel("calibration objective")
    left.set_title("FW objective")

    shares = vertex_shares(trace, labels)
    bottom = [0.0] * len(trace)
    names = [BASE] + list(labels)
    for name in names:
        values = shares[name]
        right.bar(range(len(trace)), values, bottom=bottom, label=BASE if name == BASE else short_label(name))
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_xlabel("iteration")
    right.set_ylabel("share of blocks")
    right.set_ylim(0, 1)
    right.set_title("vertex chosen per block")
    right.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
