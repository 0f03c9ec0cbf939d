"""`fwllm --help` and the errors about a recipe or its calibration data come before torch loads.

Each check runs the CLI in a fresh interpreter and reads `-X importtime`'s list of every
module it imported: the heavy libraries must not be on it.
"""

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fwllm.cli import VERBS, main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "mergekit", "transformers", "peft", "lm_eval")


def run_cli(args, cwd, home):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(home), FWLLM_CACHE=str(home / "cache"))
    env.pop("FWLLM_VERBOSE", None)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fwllm.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.splitlines()
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    messages = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    return done, {name.split(".")[0] for name in imported}, messages


def assert_light(top_level):
    assert not top_level & set(HEAVY), sorted(top_level & set(HEAVY))


def test_help_lists_every_verb_without_heavy_imports(tmp_path):
    done, top_level, messages = run_cli(["--help"], tmp_path, tmp_path)
    assert done.returncode == 0, messages
    assert "fwllm" in top_level  # the import list is real: fwllm itself is on it
    assert_light(top_level)
    for verb in VERBS:
        assert f"\n  {verb} " in done.stdout


def test_help_matches_what_click_prints_with_the_real_commands():
    lazy = CliRunner().invoke(main, ["--help"])
    commands = {name: main.get_command(None, name) for name in VERBS}
    plain = click.Group(
        name=main.name,
        commands=commands,
        params=main.params,
        help=main.help,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    assert lazy.exit_code == 0
    assert lazy.output == CliRunner().invoke(plain, ["--help"]).output


@pytest.mark.parametrize("verb", ["merge", "eval", "demo", "experts"])
def test_other_verbs_help_is_light(tmp_path, verb):
    done, top_level, messages = run_cli([verb, "--help"], tmp_path, tmp_path)
    assert done.returncode == 0, messages
    assert_light(top_level)


def assert_one_error_line(done, messages, starts):
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(messages) == 1 and messages[0].startswith(f"Error: {starts}"), messages


def test_missing_recipe_is_one_error_line_before_heavy_imports(tmp_path):
    done, top_level, messages = run_cli(["merge", "missing.yml", "out"], tmp_path, tmp_path)
    assert_one_error_line(done, messages, "recipe not found: missing.yml")
    assert_light(top_level)
    assert not (tmp_path / "out").exists()


def test_malformed_recipe_is_one_error_line_before_heavy_imports(tmp_path):
    (tmp_path / "bad.yml").write_text("merge_method: fw_merging\nmodels: [\n")
    done, top_level, messages = run_cli(["merge", "bad.yml", "out", "--cuda"], tmp_path, tmp_path)
    assert_one_error_line(done, messages, "bad.yml is not valid YAML (line 3")
    assert_light(top_level)


def fw_recipe(folder, calibration, extra=""):
    path = folder / "recipe.yml"
    path.write_text(
        f"merge_method: fw_merging\nbase_model: base\nmodels:\n  - model: a\n"
        f"parameters:\n  calibration: {calibration}\n{extra}"
    )
    return path


def test_missing_calibration_is_one_error_line_before_heavy_imports(tmp_path):
    fw_recipe(tmp_path, "nowhere.jsonl")
    done, top_level, messages = run_cli(["merge", "recipe.yml", "out"], tmp_path, tmp_path)
    assert_one_error_line(done, messages, "calibration data not found: nowhere.jsonl")
    assert_light(top_level)


def test_broken_calibration_row_is_one_error_line_before_heavy_imports(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    # found beside the recipe (the CWD is its parent), as load_recipe resolves it
    (sub / "calib.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n')
    fw_recipe(sub, "calib.jsonl")
    done, top_level, messages = run_cli(["merge", "recipes/recipe.yml", "out"], tmp_path, tmp_path)
    assert_one_error_line(done, messages, f"{sub / 'calib.jsonl'}:2: not valid JSON")
    assert_light(top_level)


def test_missing_model_folder_is_one_error_line_before_heavy_imports(tmp_path):
    """A recipe whose YAML and calibration are fine but whose base model is a path to no folder."""
    (tmp_path / "calib.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "a").mkdir()
    fw_recipe(tmp_path, "calib.jsonl").write_text(
        "merge_method: fw_merging\nbase_model: ./base\nmodels:\n  - model: a\n"
        "parameters:\n  calibration: calib.jsonl\n"
    )
    done, top_level, messages = run_cli(["merge", "recipe.yml", "out", "--cuda"], tmp_path, tmp_path)
    assert_one_error_line(done, messages, "model folder not found: ./base")
    assert_light(top_level)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "recipe, starts",
    [
        ("merge_method: ties\nbase_model: base\nmodels:\n  - model: base+./lora\n", "model folder not found"),
        ("merge_method: ties\nbase_model: base\nmodels:\n  - model: nowhere/x/y\n", "model folder not found"),
        ("merge_method: linear\nmodels:\n  - model: ~/no-such-model\n", "model folder not found"),
        ("merge_method: regmean\nbase_model: base\nmodels: [{model: a}]\n", "regmean needs `parameters"),
        (
            "merge_method: fw_merging\nbase_model: base\nmodels: [{model: a}]\n"
            "parameters: {calibration: c.jsonl, max_iter: 3}\n",
            "fw_merging: unknown parameter 'max_iter'",
        ),
        (
            "merge_method: fisher\nbase_model: base\nmodels: [{model: a}]\n"
            "parameters: {calibration: c.jsonl, max_rows: 0}\n",
            "fisher: max_rows must be >= 1",
        ),
        (
            "merge_method: adamerging\nbase_model: base\nmodels: [{model: a, parameters: {weight: 2}}]\n"
            "parameters: {calibration: c.jsonl}\n",
            "adamerging: unknown per-model parameter(s) ['weight']",
        ),
    ],
)
def test_early_check_reports_what_load_recipe_reports(tmp_path, monkeypatch, recipe, starts):
    """Each recipe has one mistake; the early check finds it, worded as the merge's own check words it."""
    from fwllm.cli.merge import check_inputs_early
    from fwllm.core.errors import FwllmError
    from fwllm.mergekit_glue.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "c.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "r.yml").write_text(recipe)
    with pytest.raises(FwllmError) as early:
        check_inputs_early("r.yml")
    with pytest.raises(FwllmError) as full:
        load_recipe("r.yml")
    assert str(early.value) == str(full.value)
    assert str(early.value).startswith(starts)


def test_early_check_passes_what_the_merge_accepts(tmp_path, monkeypatch):
    from fwllm.cli.merge import check_inputs_early

    sub = tmp_path / "recipes"
    sub.mkdir()
    # the third row is broken, but max_rows: 2 never reads it (nor does the merge)
    (sub / "calib.jsonl").write_text('{"prompt": "a", "response": "b"}\n' * 2 + "not json\n")
    monkeypatch.chdir(tmp_path)
    check_inputs_early(str(fw_recipe(sub, "calib.jsonl", "  max_rows: 2\n")))
    # mergekit's own methods take no calibration: a stray key is not read
    (sub / "ties.yml").write_text("merge_method: ties\nparameters:\n  calibration: nowhere.jsonl\n")
    check_inputs_early(str(sub / "ties.yml"))
    # model folders beside the recipe (not in the CWD), an adapter on a base, and Hub ids (not looked up)
    for folder in ("base", "lora", "a"):
        (sub / folder).mkdir()
    (sub / "local.yml").write_text(
        "merge_method: linear\nbase_model: base\nmodels:\n  - model: base+lora\n  - model: ./a\n"
        "  - model: org/hub-model\n  - model: hub-model\n"
    )
    check_inputs_early(str(sub / "local.yml"))


def test_data_methods_are_the_registered_ones():
    from fwllm.cli.merge import DATA_METHODS
    from fwllm.methods.registry import METHODS

    assert sorted(DATA_METHODS) == sorted(METHODS.names())
    for name, (params, per_model) in DATA_METHODS.items():
        method = METHODS.get(name)
        assert params is method.Params and set(per_model) == set(method.per_model), name


def test_unknown_parameter_is_one_error_line_before_heavy_imports(tmp_path):
    fw_recipe(tmp_path, "nowhere.jsonl", "  max_iter: 10\n")
    done, top_level, messages = run_cli(["merge", "recipe.yml", "out"], tmp_path, tmp_path)
    assert_one_error_line(done, messages, "fw_merging: unknown parameter 'max_iter' (known: ")
    assert_light(top_level)


def test_merge_keeps_mergekits_options_after_its_own():
    from mergekit.options import MergeOptions, add_merge_options

    from fwllm.cli.merge import merge_command

    eager = click.command()(add_merge_options(lambda merge_options: None))
    # the CLI's help option names: click caches the help option a command first makes
    params = merge_command.get_params(click.Context(merge_command, help_option_names=["-h", "--help"]))
    names = [p.name for p in params]
    mergekit_names = [p.name for p in eager.params]
    assert set(MergeOptions.model_fields) == set(mergekit_names)
    assert names[:2] == ["recipe", "out_dir"] and {"force", "no_cache"} <= set(names)
    # mergekit's options, in mergekit's order, follow fwllm's; then --help
    assert names[-len(mergekit_names) - 1 : -1] == mergekit_names and "--help" in params[-1].opts


def eager_merge_options_command(seen):
    """mergekit's own options, attached by add_merge_options (what fwllm merge declares without it)."""
    from mergekit.options import add_merge_options

    return click.command()(add_merge_options(lambda merge_options: seen.append(merge_options)))


def mergekit_params(command):
    """A command's options for MergeOptions' fields (`params`: get_params would cache a help option)."""
    from mergekit.options import MergeOptions

    return [p for p in command.params if p.name in MergeOptions.model_fields]


def test_merge_declares_mergekits_options_as_add_merge_options_does():
    from fwllm.cli.merge import merge_command

    eager = mergekit_params(eager_merge_options_command([]))
    ours = {p.name: p for p in mergekit_params(merge_command)}
    fields = ("opts", "secondary_opts", "default", "help", "show_default", "count", "is_flag", "multiple")
    for theirs in eager:
        mine = ours[theirs.name]
        assert {f: getattr(mine, f) for f in fields} == {f: getattr(theirs, f) for f in fields}, theirs.name
        assert (mine.type.name, type(mine.type).__name__ == "ShardSize") == (
            theirs.type.name,
            type(theirs.type).__name__ == "ShardSizeParamType",
        ), theirs.name
    assert all(p.help for p in eager) and len(eager) > 20


def test_merge_help_is_what_click_prints_with_mergekits_options_attached():
    """`fwllm merge --help` as it was when mergekit.options was imported to declare the options."""
    from mergekit.options import add_merge_options

    from fwllm.cli.merge import merge_command

    own = merge_command.params[:7]  # fwllm's: the arguments and options declared in fwllm.cli.merge
    assert [p.name for p in own] == [
        "recipe",
        "out_dir",
        "force",
        "no_cache",
        "allow_pickle",
        "lora_out",
        "lora_rank",
    ]
    wrapped = add_merge_options(lambda **kw: None)
    eager = click.Command(
        "merge",
        params=own + list(reversed(wrapped.__click_params__)),
        help=merge_command.help,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    group = click.Group(main.name, context_settings={"help_option_names": ["-h", "--help"]})
    lazy_out = CliRunner().invoke(main, ["merge", "--help"], terminal_width=100)
    group.add_command(eager)
    eager_out = CliRunner().invoke(group, ["merge", "--help"], terminal_width=100)
    assert lazy_out.exit_code == eager_out.exit_code == 0
    assert "--out-shard-size SIZE" in lazy_out.output and "Allow mixing architectures" in lazy_out.output
    assert lazy_out.output == eager_out.output


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--cuda", "-vv", "-j", "3", "--out-shard-size", "500M", "--no-copy-tokenizer", "--random-seed", "7"],
        ["--gpu-rich", "--lora-merge-dtype", "bfloat16", "--device", "cpu", "--write-threads", "2"],
    ],
)
def test_merge_builds_mergekits_merge_options_as_mergekit_does(args):
    from fwllm.cli.merge import merge_command
    from fwllm.cli.mergekit_options import with_merge_options

    theirs = []
    eager = eager_merge_options_command(theirs)
    eager.invoke(eager.make_context("mergekit", list(args)))
    # an option first: the leading-recipe check (check_inputs_early) is not what this test is about
    ctx = merge_command.make_context("merge", ["--force", *args, "recipe.yml", "out"])
    mine = with_merge_options(lambda merge_options, **fwllm_own: (merge_options, fwllm_own), ctx.params)
    assert mine[0] == theirs[0]
    assert mine[1]["recipe"] == "recipe.yml" and mine[1]["force"] is True
