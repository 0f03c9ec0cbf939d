"""mergekit's merge options (`mergekit.options.add_merge_options`) as click options, without importing it.

Importing mergekit.options loads torch and transformers (seconds); `fwllm merge --help` and the checks
of a recipe before its merge must not wait for that. So the options are declared here from a table of
MergeOptions' fields, made the way add_merge_options makes them; their help texts are mergekit's own,
read from its source (`OPTION_HELP`, a literal) without running it. tests/cli checks that these options
are the ones add_merge_options makes and that `fwllm merge --help` prints the same either way. The values
are handed to mergekit's own wrapper (`merge_options`), so MergeOptions is built exactly as mergekit does.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Callable, Dict, List, Optional

import click

# MergeOptions' fields in its order: (name, type, default). Optional[X] fields are X with default None.
SIZE = "size"  # out_shard_size: mergekit's ShardSizeParamType ("5B", "500M", ...)
FIELDS = (
    ("allow_crimes", bool, False),
    ("unsafe_truncate_embeddings", bool, False),
    ("transformers_cache", str, None),
    ("lora_merge_cache", str, None),
    ("lora_merge_dtype", str, None),
    ("cuda", bool, False),
    ("device", str, None),
    ("low_cpu_memory", bool, False),
    ("out_shard_size", SIZE, 5 * 1000**3),  # parse_kmb("5B")
    ("copy_tokenizer", bool, True),
    ("clone_tensors", bool, False),
    ("trust_remote_code", bool, False),
    ("random_seed", int, None),
    ("lazy_unpickle", bool, False),
    ("write_model_card", bool, True),
    ("safe_serialization", bool, True),
    ("verbosity", int, 0),
    ("quiet", bool, False),
    ("read_to_gpu", bool, False),
    ("multi_gpu", bool, False),
    ("num_threads", int, None),
    ("gpu_rich", bool, False),
    ("async_write", bool, False),
    ("write_threads", int, 1),
)
NAMES = tuple(name for name, _, _ in FIELDS)

# the fields add_merge_options declares otherwise than `--name` (`--name/--no-name` for a bool)
SPECIAL = {
    "verbosity": (["-v", "verbosity"], {"count": True}),
    "num_threads": (["--num-threads", "-j"], {}),
    "gpu_rich": (["--gpu-rich"], {"is_flag": True}),
}
NO_SHOWN_DEFAULT = ("out_shard_size", "verbosity")


class ShardSize(click.ParamType):
    """mergekit's ShardSizeParamType, loaded when a value is converted (a merge runs), not at --help."""

    name = SIZE

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        from mergekit.options import ShardSizeParamType

        return ShardSizeParamType().convert(value, param, ctx)


def mergekit_help() -> Dict[str, str]:
    """mergekit.options.OPTION_HELP, read from the module's source: running it would import torch."""
    # find_spec of "mergekit.options" would import the mergekit package; the top-level name imports nothing
    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        return {}
    for folder in spec.submodule_search_locations:
        source = os.path.join(folder, "options.py")
        if os.path.isfile(source):
            break
    else:
        return {}
    with open(source, encoding="utf-8") as fp:
        tree = ast.parse(fp.read())
    for node in tree.body:
        targets = [getattr(t, "id", None) for t in getattr(node, "targets", [])]
        if isinstance(node, ast.Assign) and "OPTION_HELP" in targets:
            return ast.literal_eval(node.value)
    return {}


def click_options() -> List[click.Option]:
    """The options add_merge_options would attach, in MergeOptions' field order."""
    help_texts = mergekit_help()
    options = []
    for name, kind, default in FIELDS:
        flag = name.replace("_", "-")
        decls, extra = SPECIAL.get(name, ([f"--{flag}/--no-{flag}" if kind is bool else f"--{flag}"], {}))
        options.append(
            click.Option(
                decls,
                type=ShardSize() if kind == SIZE else kind,
                default=default,
                help=help_texts.get(name),
                show_default=name not in NO_SHOWN_DEFAULT,
                **extra,
            )
        )
    return options


def with_merge_options(command: Callable[..., Any], values: Dict[str, Any]) -> Any:
    """Call `command(merge_options=MergeOptions(...))` as add_merge_options' wrapper does, from the values
    click parsed for the options above."""
    from mergekit.options import add_merge_options

    return add_merge_options(command)(**values)
