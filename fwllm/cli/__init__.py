"""`fwllm` console script: a small click group whose verbs live in their own modules.

Verbs are imported lazily so `fwllm --help` stays fast and one verb's heavy imports
(lm-eval, peft) never slow down another.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

# verb -> "module:attribute" of a click.Command
VERBS = {
    "merge": "fwllm.cli.merge:merge_command",
    "experts": "fwllm.cli.experts:experts_command",
    "eval": "fwllm.cli.eval:eval_command",
    "demo": "fwllm.cli.demo:demo_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(VERBS)

    def get_command(self, ctx, name):
        target = VERBS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fwllm")
def main():
    """Data-informed model merging (FW-Merging, Fisher, RegMean, AdaMerging) for mergekit users."""
    if not os.environ.get("FWLLM_VERBOSE"):
        # transformers' per-load reports and bars drown fwllm's own progress bars
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
