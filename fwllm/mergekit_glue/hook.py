"""fwllm's side of the startup hook: what happens when plain `mergekit-yaml` imports mergekit.

mergekit has no plugin entry points, so `fwllm_mergekit.pth` loads the top-level module
`fwllm_hook` in every Python process; it imports this module only when one of the mergekit
modules below finishes importing, and guards every call (a broken fwllm leaves mergekit as it is).
When `mergekit.merge_methods` finishes importing, fwllm's methods are registered; when
`mergekit.card` is imported, its Hub check treats an existing local folder as local
(otherwise a relative path triggers a Hub request, which fails offline). Each
`mergekit.merge.run_merge` starts a new run for the adapter's plans (`start_run`), so an
in-process rerun after an edit sees the edit, while one run keeps one plan; a run of one of
fwllm's methods writes its output through `StreamingTensorWriter`; `mergekit-yaml` prints fwllm's
refusals as one `Error:` line.
Set FWLLM_NO_MERGEKIT_HOOK=1 to disable.
"""

import os
import sys

_AFTER = {}


def _after(module_name):
    def register(fn):
        _AFTER[module_name] = fn
        return fn

    return register


@_after("mergekit.merge_methods")
def _register_methods(module):
    partial = sys.modules.get("fwllm.mergekit_glue.adapter")
    if partial is not None and not hasattr(partial, "register_all"):
        return  # fwllm's own adapter is importing mergekit: it registers the methods when it is used
    from fwllm.mergekit_glue.adapter import register_all  # only once mergekit itself is being imported

    register_all()


@_after("mergekit.card")
def _offline_safe_card(module):
    original = module.is_hf

    def is_hf(path: str) -> bool:
        if os.path.exists(path):
            return False  # a local folder is local, whatever the Hub holds under that name
        return original(path)

    module.is_hf = is_hf


@_after("mergekit.merge")
def _plans_per_run(module):
    original = module.run_merge

    def run_merge(merge_config, *args, **kwargs):
        import contextlib

        from fwllm.io.staged_output import check_plan_folder, folder_lock, is_staging
        from fwllm.mergekit_glue.adapter import is_fwllm_method, start_run
        from fwllm.mergekit_glue.streaming_writer import streaming_output

        start_run()
        if not is_fwllm_method(getattr(merge_config, "merge_method", None)):
            return original(merge_config, *args, **kwargs)
        plan = (getattr(merge_config, "parameters", None) or {}).get("plan")
        if isinstance(plan, str) and plan:
            check_plan_folder(plan)  # a user's folder is refused before any tensor is read
        out = args[0] if args else kwargs.get("out_path")
        # one run writes OUT_DIR at a time (`fwllm merge` already holds its staging folder's target's lock)
        mine = isinstance(out, (str, os.PathLike)) and not is_staging(os.fspath(out))
        lock = folder_lock(os.path.realpath(out)) if mine else contextlib.nullcontext()
        with lock, streaming_output():  # fwllm's merges write one tensor at a time
            return original(merge_config, *args, **kwargs)

    run_merge.__doc__, run_merge.__wrapped__ = original.__doc__, original
    module.run_merge = run_merge


@_after("mergekit.scripts.run_yaml")
def _one_line_errors(module):
    """`mergekit-yaml` reports fwllm's refusals (a bad recipe value, a user's folder as `plan:`, too little
    memory) as one `Error:` line, as `fwllm merge` does, not as a traceback; other errors stay mergekit's."""
    import click

    command = module.main
    original = command.callback

    def callback(*args, **kwargs):
        from fwllm.core.errors import FwllmError

        try:
            return original(*args, **kwargs)
        except FwllmError as err:
            raise click.ClickException(str(err)) from None

    callback.__doc__, callback.__wrapped__ = original.__doc__, original
    command.callback = callback


def after_import(module):
    """Run fwllm's callback for a mergekit module that has just been imported (called by fwllm_hook,
    which catches anything raised here and then leaves mergekit's own behaviour in place)."""
    adapter = sys.modules.get("fwllm.mergekit_glue.adapter")
    if module.__name__ == "mergekit.merge" and (adapter is None or hasattr(adapter, "register_all")):
        # run_merge's wrapper imports these on every merge: a broken install must fail here, before
        # the wrapper replaces mergekit's run_merge, not inside every later merge (ties included).
        # (A half-imported adapter is fwllm itself importing mergekit: not broken, and not safe to import.)
        import fwllm.mergekit_glue.adapter  # noqa: F401
        import fwllm.mergekit_glue.streaming_writer  # noqa: F401
    _AFTER[module.__name__](module)


def install():
    """Kept for `fwllm_mergekit.pth` files written by older fwllm versions."""
    import fwllm_hook

    fwllm_hook.install()
