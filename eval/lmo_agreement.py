"""How often does the sketched LMO pick the same vertex as the exact one?

Takes a base, candidates and calibration data; computes the gradient of the calibration
objective at the base once, then per weight tensor compares the vertex chosen from exact
inner products <g, tau_i> with the one chosen from sketches at several ratios. Also
reports what a disagreement costs: the exact alignment <g, s> of the sketch's vertex as a
share of the best one's (100% = as good as the exact choice), summed over the tensors.
With `--rescore Z [Z ...]` it also scores the verified LMO (`rescore: Z`): sketched scores whose
intervals (+- Z sketch errors) overlap the best one's are re-checked exactly, and the table
says how many candidate tensors that reads, as a share of reading all N.
Prints a table.

    python eval/lmo_agreement.py --base BASE --candidates C1 C2 ... --calibration FILE_OR_DIR
"""

from __future__ import annotations

import argparse

import torch

from fwllm.data.calibration import load_calibration
from fwllm.io.models import load_model, load_tokenizer
from fwllm.io.candidates import open_candidate
from fwllm.data.objective import encode_tasks
from fwllm.kernels.sketch import CountSketch, rescored, sketch_error
from fwllm.kernels.lmo import choose_vertex


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--candidates", nargs="+", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--ratios", type=float, nargs="+", default=[8, 32, 128])
    ap.add_argument("--max-rows", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument(
        "--rescore", type=float, nargs="*", default=[1.5, 3.0], help="z values of the verified LMO"
    )
    ap.add_argument("--out", default="", help="also write the table as markdown here")
    args = ap.parse_args(argv)

    model, tok = load_model(args.base), load_tokenizer(args.base)
    encode_tasks(load_calibration(args.calibration, args.max_rows), tok, model, args.max_length, 4).backward(
        model
    )
    cands = [open_candidate(c) for c in args.candidates]
    sketches = {r: CountSketch(r) for r in args.ratios}
    modes = [(r, z) for z in [0.0] + [z for z in args.rescore if z > 0] for r in args.ratios]
    agree = {m: 0 for m in modes}
    kept = {m: 0.0 for m in modes}  # sum over tensors of the exact <g, s> the sketch's choice gets
    reads = {m: 0 for m in modes}  # exact candidate tensors read to re-check
    best_total = 0.0
    total = exact_base = 0
    for name, p in model.named_parameters():
        if p.grad is None or p.numel() <= 4096:
            continue  # small tensors are kept exactly: agreement is 1 by construction
        base = p.detach().float()
        g = p.grad.float()
        taus = [c.task_vector(name, base) for c in cands]
        exact = torch.stack([torch.sum(g * t) for t in taus])
        choice = choose_vertex(exact)
        exact_base += int(choice == -1)
        value = lambda i: float(exact[i]) if i >= 0 else 0.0  # noqa: E731  (the base vertex: <g, 0>)
        best_total += value(choice)
        norms = torch.stack([t.norm() for t in taus])
        for r, sk in sketches.items():
            sg = sk(name, g)
            approx = torch.stack([torch.dot(sg, sk(name, t)) for t in taus])
            for mode in [m for m in modes if m[0] == r]:
                scores, checked = approx, []
                if mode[1] > 0:
                    sigma = sketch_error(float(g.norm()), norms, sk.buckets(g.numel()))
                    scores, checked = rescored(approx, sigma, mode[1], lambda i: float(exact[i]))
                picked = choose_vertex(scores)
                agree[mode] += int(picked == choice)
                kept[mode] += value(picked)
                reads[mode] += len(checked)
        total += 1
    lines = [
        f"{total} sketched tensors, {len(cands)} candidates; exact LMO picks the base in {exact_base}",
        "",
        "| sketch ratio | rescore z | LMO agreement with exact | descent kept (sum of <g, s>, % of exact) "
        "| exact tensors read (% of N per tensor) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r:g} | {z:g} | {agree[(r, z)] / max(total, 1):.1%} | "
        f"{kept[(r, z)] / best_total if best_total else 1.0:.1%} | "
        f"{reads[(r, z)] / max(total * len(cands), 1):.1%} |"
        for r, z in modes
    ]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fp:
            fp.write(
                f"# Sketched vs exact LMO\n\n`python eval/lmo_agreement.py --base {args.base} --candidates "
                f"{' '.join(args.candidates)} --calibration {args.calibration} --max-rows {args.max_rows} "
                f"--max-length {args.max_length} --rescore {' '.join(f'{z:g}' for z in args.rescore)}`\n\n"
                + "\n".join(lines)
                + "\n"
            )


if __name__ == "__main__":
    main()
