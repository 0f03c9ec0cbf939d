"""Startup hook (loaded from fwllm_mergekit.pth) that lets plain `mergekit-yaml` see fwllm.

mergekit has no plugin entry points. This module only installs a meta-path finder,
so programs that never import mergekit pay one tiny import and nothing else. When
`mergekit.merge_methods` finishes importing, fwllm's methods are registered; when
`mergekit.card` is imported, its Hub check treats an existing local folder as local
(otherwise a relative path triggers a Hub request, which fails offline). Each
`mergekit.merge.run_merge` starts a new run for the adapter's plans (`start_run`), so an
in-process rerun after an edit sees the edit, while one run keeps one plan; a run of one of
fwllm's methods writes its output through `StreamingTensorWriter`.
Set FWLLM_NO_MERGEKIT_HOOK=1 to disable.
"""

import importlib.abc
import importlib.util
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


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, hook):
        self.inner, self.hook = inner, hook

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        try:
            self.hook(module)
        except Exception as err:  # never break mergekit because of fwllm
            print(f"fwllm: mergekit hook failed ({err}); use `fwllm merge`", file=sys.stderr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        hook = _AFTER.get(name)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, hook)
                return spec
        return None


def install():
    if os.environ.get("FWLLM_NO_MERGEKIT_HOOK") or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
