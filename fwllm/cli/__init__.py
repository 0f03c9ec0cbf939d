"""`fwllm` console script: a small click group whose verbs live in their own modules.

Verbs are imported lazily so `fwllm --help` stays fast and one verb's heavy imports
(lm-eval, peft) never slow down another: the group lists the verbs with the one-line
help written here, and imports a verb's module only to run it (or show its own help).
"""

from __future__ import annotations

import importlib
import os
import sys

import click

# verb -> ("module:attribute" of a click.Command, its help's first sentence; tests/cli checks they agree)
VERBS = {
    "merge": (
        "fwllm.cli.merge:merge_command",
        "Merge RECIPE (a mergekit-yaml recipe) into OUT_DIR; fwllm's methods included.",
    ),
    "experts": (
        "fwllm.cli.experts:experts_command",
        "Build a pool of really-trained experts offline (cached; a second run reuses it).",
    ),
    "eval": (
        "fwllm.cli.eval:eval_command",
        "Evaluate MODEL_DIR... and print one table (models x tasks); scores are x100.",
    ),
    "demo": (
        "fwllm.cli.demo:demo_command",
        "Build experts, merge them (tuned TA, RegMean, FW-Merging), score them with task metrics, "
        "print one table.",
    ),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(VERBS)

    def get_command(self, ctx, name):
        target = VERBS.get(name)
        if target is None:
            return None
        module_name, attr = target[0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx, formatter):
        """click's command list, from VERBS: importing every verb to read its help would load torch."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        with formatter.section("Commands"):
            # a bare Command per verb shortens the line exactly as click does for the real one
            formatter.write_dl(
                [(name, click.Command(name, help=VERBS[name][1]).get_short_help_str(limit)) for name in names]
            )


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fwllm")
def main():
    """Data-informed model merging (FW-Merging, Fisher, RegMean, AdaMerging) for mergekit users."""
    if not os.environ.get("FWLLM_VERBOSE"):
        _quiet_transformers()


def _quiet_transformers() -> None:
    """transformers' per-load reports and bars drown fwllm's own progress bars. Through the environment
    (read when transformers loads), so a verb that never needs transformers never waits for its import."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already loaded (an embedding program): tell it directly
        transformers = sys.modules["transformers"]
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
