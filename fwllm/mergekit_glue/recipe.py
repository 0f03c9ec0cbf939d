"""Reading a mergekit recipe the way `fwllm merge` needs it: strictly.

mergekit silently drops keys it does not know; for fwllm's own methods every
parameter is validated here so a misspelt key is an error, and every model path is
resolved (to an absolute local folder) before anything runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import yaml
from pydantic import ValidationError

from fwllm.core.errors import FwllmError
from fwllm.core.job import CandidateSpec, MergeJob
from fwllm.core.paths import is_hub_id

if TYPE_CHECKING:
    from fwllm.core.method import DataMethod

# mergekit, fwllm's methods and fwllm.io (all of which load torch) are imported where they are used:
# `fwllm merge` reads the recipe with `read_yaml` before any of them loads, so a typo is reported at once.


@dataclass
class Recipe:
    source: str  # the YAML text as the user wrote it
    raw: Dict[str, Any]
    config: Any  # mergekit MergeConfiguration (with absolute local paths)
    method: Optional[DataMethod]  # set for fwllm's data-informed methods


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a recipe that gives a key twice is an error."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> Tuple[str, Dict[str, Any]]:
    """The recipe's text and its mapping; one clear error for a missing, binary or malformed file."""
    if not os.path.isfile(path):
        raise FwllmError(f"recipe not found: {path}")
    try:
        with open(path, encoding="utf-8") as fp:
            source = fp.read()
    except UnicodeDecodeError as err:
        raise FwllmError(f"{path} is not a text (UTF-8) file: byte {err.start} cannot be decoded") from None
    try:
        raw = yaml.load(source, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise FwllmError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise FwllmError(f"{path}: a recipe is a YAML mapping with merge_method, models, ...")
    return source, raw


def _absolute(path: str, recipe_dir: str) -> str:
    """Local paths become absolute (relative to the CWD, then to the recipe); Hub ids stay."""
    for candidate in (path, os.path.join(recipe_dir, path)):
        if os.path.isdir(os.path.expanduser(candidate)):
            return os.path.abspath(os.path.expanduser(candidate))
    return path


def _localise(raw: Dict[str, Any], recipe_dir: str, hub: bool = True) -> Dict[str, Any]:
    """Resolve every model reference so mergekit never asks the Hub about local folders.

    `hub=False` only checks that every reference that is no Hub id names a folder: no torch, no Hub."""
    raw = dict(raw)

    def fix(ref: Any) -> Any:
        if isinstance(ref, str):
            if not ref.strip():
                raise FwllmError("recipe: a model reference is empty")
            parts = ref.split("+")
            for p in parts:
                if os.path.isdir(_absolute(p, recipe_dir)):
                    continue
                if not is_hub_id(p):
                    raise FwllmError(f"model folder not found: {p}")
                if hub:
                    from fwllm.io.models import resolve_model_path

                    resolve_model_path(p)  # cached, downloadable, or one clear error
            return "+".join(_absolute(p, recipe_dir) for p in parts)
        return ref

    if "base_model" in raw:
        raw["base_model"] = fix(raw["base_model"])
    models = raw.get("models") or []
    if not isinstance(models, list):
        raise FwllmError("recipe: `models` must be a list of {model: ...} entries")
    raw["models"] = [dict(m, model=fix(m.get("model"))) if isinstance(m, dict) else m for m in models]
    for entry in raw["models"]:
        if not isinstance(entry, dict) or not entry.get("model"):
            raise FwllmError("recipe: every entry of `models` needs a `model:`")
    return raw


def check_method_params(method: DataMethod, local: Dict[str, Any]):
    """The recipe's parameters and each model's, for one of fwllm's methods; its validated params."""
    params = method.validate_params(local.get("parameters") or {})
    known = set(method.per_model)
    for entry in local["models"]:
        extra = set(entry.get("parameters") or {}) - known
        if extra:
            raise FwllmError(
                f"{method.name}: unknown per-model parameter(s) {sorted(extra)} (known: {sorted(known)})"
            )
    return params


def check_early(path: str, raw: Dict[str, Any], method: Optional[DataMethod]):
    """`load_recipe`'s checks less those that need mergekit (the method's name, its configuration) or the
    Hub (a Hub id is not looked up): `fwllm merge` runs them before torch loads. `method`: the recipe's
    when it is one of fwllm's (light: no solver), whose validated params are returned."""
    name = raw.get("merge_method")
    if not name or not isinstance(name, str):
        return None  # load_recipe says so
    _check_mappings(path, raw)
    recipe_dir = os.path.dirname(os.path.abspath(path))
    local = _localise(raw, recipe_dir, hub=False)
    if method is None:
        return None
    local["parameters"] = _localise_files(local.get("parameters") or {}, recipe_dir)
    return check_method_params(method, local)


def _localise_files(params: Dict[str, Any], recipe_dir: str) -> Dict[str, Any]:
    """`calibration` and `plan` paths: as given from the CWD, else relative to the recipe file."""
    params = dict(params)
    for key in ("calibration", "plan"):
        value = params.get(key)
        if isinstance(value, str) and not value.strip():
            # an empty path is no path: joined to the recipe's folder it would name that folder
            raise FwllmError(f"recipe: parameters.{key} is empty")
        if isinstance(value, str) and value.startswith("~"):
            value = params[key] = os.path.expanduser(value)
        if isinstance(value, str) and not os.path.exists(value):
            beside = os.path.join(recipe_dir, value)
            if os.path.exists(beside) or key == "plan":
                params[key] = os.path.abspath(beside if os.path.exists(beside) else value)
    return params


def _check_mappings(path: str, raw: Dict[str, Any]) -> None:
    """`parameters` (of the recipe and of each model) must be mappings: fwllm reads them as such."""
    if raw.get("parameters") is not None and not isinstance(raw["parameters"], dict):
        raise FwllmError(f"{path}: `parameters` must be a mapping of name: value")
    for i, entry in enumerate(raw.get("models") or [] if isinstance(raw.get("models"), list) else []):
        given = entry.get("parameters") if isinstance(entry, dict) else None
        if given is not None and not isinstance(given, dict):
            raise FwllmError(f"{path}: models[{i}].parameters must be a mapping of name: value")


def load_recipe(path: str) -> Recipe:
    from mergekit.config import MergeConfiguration

    from fwllm.mergekit_glue.adapter import available_methods
    from fwllm.methods.registry import METHODS

    source, raw = read_yaml(path)
    name = raw.get("merge_method")
    if not name:
        raise FwllmError(f"{path}: no merge_method given")
    if not isinstance(name, str):
        raise FwllmError(f"{path}: merge_method must be a method name, got {name!r}")
    _check_mappings(path, raw)
    methods = available_methods()
    if name not in methods:
        raise FwllmError(f"unknown merge_method {name!r}; available: {', '.join(methods)}")
    method = METHODS.get(name) if name in METHODS else None
    recipe_dir = os.path.dirname(os.path.abspath(path))
    local = _localise(raw, recipe_dir)
    if method is not None:
        local["parameters"] = _localise_files(local.get("parameters") or {}, recipe_dir)
        check_method_params(method, local)
    try:
        config = MergeConfiguration.model_validate(local)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise FwllmError(f"{path}: {where}: {first['msg']}") from None
    except (RuntimeError, TypeError, ValueError) as err:  # mergekit's own validators raise these
        raise FwllmError(f"{path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    _check_models(config)
    return Recipe(source, raw, config, method)


def _check_models(config) -> None:
    from fwllm.io.models import check_same_architecture, is_adapter_dir

    base = config.base_model
    full = []
    for ref in config.referenced_models():
        path = ref.model.path
        if not os.path.isdir(path):
            continue  # Hub ids were checked by _localise
        if is_adapter_dir(path):
            raise FwllmError(
                f"{path} is a LoRA adapter: write it as `BASE+{path}` (mergekit's adapter syntax)"
            )
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FwllmError(f"{path} is not a model folder (no config.json)")
        full.append(path)
    if base is not None and os.path.isdir(base.model.path):
        check_same_architecture(base.model.path, [p for p in full if p != base.model.path])


def merge_job(recipe: Recipe, plan_dir: str, device: str, progress: bool) -> MergeJob:
    config, method = recipe.config, recipe.method
    if config.base_model is None:
        raise FwllmError(f"{method.name} needs a base_model")
    params = method.validate_params(config.parameters or {})
    candidates: List[CandidateSpec] = []
    for entry in config.models or []:
        if entry.model == config.base_model:
            continue
        per = {k: (entry.parameters or {}).get(k, default) for k, (_, default) in method.per_model.items()}
        candidates.append(
            CandidateSpec(
                str(entry.model),
                entry.model.model.path,
                entry.model.lora.path if entry.model.lora else None,
                per,
            )
        )
    if not candidates:
        raise FwllmError(f"{method.name}: the candidate pool is empty (models: lists only the base)")
    return MergeJob(
        method.name,
        str(config.base_model),
        candidates,
        params,
        plan_dir,
        device=params.device or device,
        progress=progress,
    )
