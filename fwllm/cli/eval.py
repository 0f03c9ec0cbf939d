"""`fwllm eval`: score model folders on the code/math/pubmedqa/glue suites.

Heavy imports (torch, lm-eval, transformers) happen inside the command so
`fwllm eval --help` stays instant.
"""

from __future__ import annotations

import json
import os

import click

from fwllm.core.errors import FwllmError
from fwllm.evaluation.tasks import ALL_TASKS, SUITES


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "cpu"


def _read_expert_scores(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fp:
            data = json.load(fp)
    except (OSError, ValueError) as err:
        raise click.ClickException(f"cannot read expert scores {path}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise click.ClickException(f"expert scores {path} must be a JSON object {{task: score x100}}")
    return data


@click.command("eval")
@click.argument("model_dirs", nargs=-1, required=True, metavar="MODEL_DIR...")
@click.option(
    "--suite",
    "suite",
    default="math,pubmedqa,glue",
    show_default=True,
    help=f"Comma-separated suites ({', '.join(SUITES)}) and/or task names ({', '.join(ALL_TASKS)}).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Examples per task (for quick checks)."
)
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available."
)
@click.option(
    "--out",
    "out_dir",
    default="runs/eval",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for results.json/.csv/.md and PNG plots.",
)
@click.option(
    "--confirm-run-unsafe-code", is_flag=True, help="Allow the code suite to execute generated code."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option(
    "--num-fewshot",
    type=click.IntRange(min=0),
    default=None,
    help="Override the tasks' few-shot count (GSM8K uses 5 by default).",
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="auto: bfloat16 on cuda, float32 on cpu.",
)
@click.option(
    "--data",
    "data_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Evaluation data folder (default $FWLLM_DATA, else fwllm's packaged data).",
)
@click.option(
    "--cache-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Result cache (default $FWLLM_CACHE/eval or ~/.cache/fwllm/eval).",
)
@click.option("--no-cache", is_flag=True, help="Evaluate everything afresh and store nothing.")
@click.option(
    "--expert-scores",
    default=None,
    type=click.Path(dir_okay=False),
    help="JSON {task: score x100} for the normalized score (encoders default to tasks.json references).",
)
@click.option("--verbose", is_flag=True, help="Show lm-eval/transformers logging.")
def eval_command(
    model_dirs,
    suite,
    limit,
    device,
    out_dir,
    confirm_run_unsafe_code,
    batch_size,
    num_fewshot,
    dtype,
    data_dir,
    cache_dir,
    no_cache,
    expert_scores,
    verbose,
):
    """Evaluate MODEL_DIR... and print one table (models x tasks); scores are x100.

    Causal LMs run through lm-eval with fwllm's offline task YAMLs (fwllm/_data/eval_tasks);
    sequence-classification encoders are scored on the GLUE tasks they have heads for.
    """
    for d in model_dirs:
        if not os.path.isdir(d):
            raise click.ClickException(f"model folder {d} does not exist")
    from fwllm.evaluation.report import format_table, has_normalized
    from fwllm.evaluation.runner import evaluate_models

    try:
        results = evaluate_models(
            list(model_dirs),
            suites=suite.split(","),
            limit=limit,
            device=device or _default_device(),
            out_dir=out_dir,
            batch_size=batch_size,
            confirm_run_unsafe_code=confirm_run_unsafe_code,
            num_fewshot=num_fewshot,
            dtype=dtype,
            data=data_dir,
            cache_dir=cache_dir,
            use_cache=not no_cache,
            expert_scores=_read_expert_scores(expert_scores),
            verbose=verbose,
        )
    except FwllmError as err:
        raise click.ClickException(str(err)) from None

    click.echo(format_table(results))
    if has_normalized(results):
        click.echo("\nnormalized (% of expert score):")
        click.echo(format_table(results, "normalized"))
    for label, model in results["models"].items():
        if model["skipped"]:
            click.echo(f"note: {label} ({model['kind']}) skipped {', '.join(model['skipped'])}")
    cached = sum(r["cached"] for m in results["models"].values() for r in m["tasks"].values())
    if cached:
        click.echo(f"({cached} result(s) from cache)")
    click.echo(f"wrote {', '.join(results['files'].values())}")
