"""The model card (README.md) of a `fwllm merge` output.

mergekit titles the card with the folder it writes to, which for `fwllm merge` is the
staging folder (`.out.partial-...`) renamed into place afterwards; and for a data method
its graph sees only the base (the plan holds the merge), so the card's "Models Merged" list
would be empty. The card is written again with mergekit's own generator, from the recipe as
the user wrote it and under the output's final name.
"""

from __future__ import annotations

import os

from mergekit.card import generate_card
from mergekit.config import MergeConfiguration


def write_card(out_path: str, final_dir: str, config: MergeConfiguration, source: str) -> None:
    """README.md in `out_path` for the output that will be `final_dir`, listing `config`'s models."""
    name = os.path.basename(os.path.abspath(final_dir))
    with open(os.path.join(out_path, "README.md"), "w", encoding="utf-8") as fp:
        fp.write(generate_card(config=config, config_yaml=source, name=name))
