"""fwllm's startup hook: lets plain `mergekit-yaml` run fwllm's merge methods.

`fwllm_mergekit.pth` imports this module in every Python process (mergekit has no plugin
entry points), so it must cost nothing and break nothing:
- it is a top-level module that imports only `sys`: a process that never imports mergekit
  pays for one small module and a meta-path finder, not for the `fwllm` package;
- when one of the mergekit modules in `TARGETS` finishes importing, it hands the module to
  `fwllm.mergekit_glue.hook` (which registers fwllm's methods, see there);
- if fwllm cannot be imported or its callback fails (a half-upgraded install), mergekit keeps
  its own behaviour: nothing is printed, and only a merge that asks for a method mergekit
  does not know gets one warning line saying why fwllm's methods are missing.
FWLLM_NO_MERGEKIT_HOOK=1 disables it (the .pth line reads it before importing this module).
"""

import sys

# mergekit modules whose import fwllm.mergekit_glue.hook follows (its _AFTER holds the callbacks)
TARGETS = frozenset(
    {"mergekit.merge_methods", "mergekit.card", "mergekit.merge", "mergekit.scripts.run_yaml"}
)

# Why fwllm's callbacks could not run, first failure only; None while all is well.
_failure = None


def _after_import(module):
    global _failure
    try:
        from fwllm.mergekit_glue import hook

        hook.after_import(module)
    except Exception as err:  # a broken fwllm must leave mergekit exactly as it is
        _failure = _failure or f"{type(err).__name__}: {err}"
    if _failure is not None and module.__name__ == "mergekit.merge":
        _warn_on_unknown_method(module)


def _known_to_mergekit(method_name):
    try:
        from mergekit.merge_methods import registry

        registry.get(method_name)
        return True
    except Exception:
        return False


def _warn_on_unknown_method(module):
    """Wrap run_merge so a merge of a method mergekit lacks says that fwllm failed to load."""
    original = module.run_merge

    def run_merge(merge_config, *args, **kwargs):
        method_name = getattr(merge_config, "merge_method", None)
        if not _known_to_mergekit(method_name):
            print(
                f"fwllm: merge method {method_name!r} unavailable: fwllm failed to load ({_failure})",
                file=sys.stderr,
            )
        return original(merge_config, *args, **kwargs)

    run_merge.__doc__, run_merge.__wrapped__ = original.__doc__, original
    module.run_merge = run_merge


class _Loader:
    """The real loader of a target module, followed by fwllm's callback."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):  # get_code, is_package, resource readers...: the real loader's
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _after_import(module)


class _Finder:
    """Finds nothing itself: for a target module it asks the other finders and wraps the loader."""

    def find_spec(self, name, path, target=None):
        if name not in TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None

    def invalidate_caches(self):
        pass


def install():
    import os  # already imported by site: free

    if os.environ.get("FWLLM_NO_MERGEKIT_HOOK") or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
