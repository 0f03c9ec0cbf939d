"""Property-based: random broken recipes and calibration files through `fwllm merge`.

Each generated input is broken by construction (a strict prefix of a JSON object, a lone
UTF-8 continuation byte in ASCII text, a key the schema forbids, ...), so the property is
exact: the command exits non-zero with exactly one `Error:` line and no traceback, leaves
nothing in or beside OUT_DIR, and fails before any model is loaded or any output staged
(sentinels on `PreTrainedModel.from_pretrained` and on the output staging).
"""

import json
import os
import shutil
import tempfile
import time

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import perturbed_copies, save_tiny_llama_base, task_rows, two_head_encoder_pool, write_jsonl
from fwllm.cli import main
from fwllm.data.calibration import MAX_ROW_BYTES

# CI: a fixed, bounded set of examples (about 20 s on 2 cores); FWLLM_FUZZ_EXAMPLES=1000
# FWLLM_FUZZ_RANDOM=1 explores further with fresh draws.
FUZZ = settings(
    max_examples=int(os.environ.get("FWLLM_FUZZ_EXAMPLES", "60")),
    deadline=None,
    database=None,
    derandomize=not os.environ.get("FWLLM_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Reached(Exception):
    """A sentinel fired: the input got past the readers."""


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_pools")
    causal = root / "causal"
    causal.mkdir()
    base = save_tiny_llama_base(causal)
    experts = perturbed_copies(base, causal, 2, 0.05, seed=1)
    encoder = root / "encoder"
    encoder.mkdir()
    two, three = two_head_encoder_pool(encoder)
    return {"base": base, "experts": experts, "enc_base": encoder / "base", "two": two, "three": three}


@pytest.fixture()
def sentinels(monkeypatch):
    """Loading a model or staging an output means the input got past every reader."""
    import transformers

    import fwllm.mergekit_glue.merge as merge_module

    def model_loaded(*a, **k):
        raise Reached("a model was loaded")

    def staged(*a, **k):
        raise Reached("the output was staged")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(model_loaded))
    monkeypatch.setattr(merge_module, "staged_output", staged)


def run_broken(recipe_text, files, workdir):
    """Write the recipe and files, run `fwllm merge`; assert the one-error-line contract."""
    for name, data in files.items():
        with open(os.path.join(workdir, name), "wb") as fp:
            fp.write(data)
    recipe = os.path.join(workdir, "r.yml")
    with open(recipe, "wb") as fp:
        fp.write(recipe_text if isinstance(recipe_text, bytes) else recipe_text.encode())
    out = os.path.join(workdir, "out")
    result = CliRunner().invoke(main, ["merge", recipe, out])
    assert not isinstance(result.exception, Reached), (
        f"{result.exception}: {recipe_text!r:.300} {files!r:.300}"
    )
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output[-2000:]
    assert "Traceback" not in result.output
    assert not os.path.exists(out) and not [p for p in os.listdir(workdir) if p.startswith(".out.")]
    return lines[0]


def fw_recipe(base, models, calibration, per_model=None, **params):
    return yaml.safe_dump(
        {
            "merge_method": "fw_merging",
            "base_model": str(base),
            "models": [
                {"model": str(m), **({"parameters": per_model[i]} if per_model else {})}
                for i, m in enumerate(models)
            ],
            "parameters": {"calibration": calibration, "iterations": 1, **params},
            "dtype": "float32",
        },
        sort_keys=False,
    )


# ---------------------------------------------------------------- broken calibration lines
digits = st.lists(st.sampled_from("0123456789"), min_size=1, max_size=4).map(" ".join)
causal_row = st.builds(
    lambda t, d: {"prompt": f"{t} : {d} =", "response": d}, st.sampled_from(["copy", "rev"]), digits
)
not_a_string = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)


@st.composite
def broken_causal_line(draw):
    row = draw(causal_row)
    line = json.dumps(row)
    how = draw(
        st.sampled_from(
            ["truncated", "wrong_type", "empty", "huge", "non_utf8", "duplicate", "no_response", "not_object"]
        )
    )
    if how == "truncated":  # a strict prefix of a JSON object never parses
        return line[: draw(st.integers(1, len(line) - 1))].encode()
    if how == "wrong_type":
        return json.dumps({**row, draw(st.sampled_from(["prompt", "response"])): draw(not_a_string)}).encode()
    if how == "empty":
        return json.dumps({**row, "response": draw(st.sampled_from(["", " ", "\t", "\n"]))}).encode()
    if how == "huge":
        return json.dumps(
            {**row, "response": "7 " * (MAX_ROW_BYTES // 2 + draw(st.integers(1, 100)))}
        ).encode()
    if how == "non_utf8":  # json.dumps writes ASCII, where any of these bytes is invalid UTF-8
        at = draw(st.integers(0, len(line)))
        bad = draw(st.sampled_from([bytes([b]) for b in list(range(0x80, 0xC0)) + list(range(0xF8, 0x100))]))
        return line[:at].encode() + bad + line[at:].encode()
    if how == "duplicate":
        key = draw(st.sampled_from(["prompt", "response"]))
        return (line[:-1] + f", {json.dumps(key)}: {json.dumps(row[key])}" + "}").encode()
    if how == "no_response":
        return json.dumps({"prompt": row["prompt"]}).encode()
    return json.dumps(
        draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5)))
    ).encode()


@FUZZ
@given(
    good=st.lists(causal_row, max_size=4), bad=broken_causal_line(), after=st.lists(causal_row, max_size=2)
)
def test_broken_causal_calibration_is_one_error_line(pools, sentinels, good, bad, after):
    lines = [json.dumps(r).encode() for r in good] + [bad] + [json.dumps(r).encode() for r in after]
    with tempfile.TemporaryDirectory() as work:
        calib = os.path.join(work, "task.jsonl")
        line = run_broken(
            fw_recipe(pools["base"], pools["experts"], calib), {"task.jsonl": b"\n".join(lines) + b"\n"}, work
        )
    assert f"task.jsonl:{len(good) + 1}:" in line  # the file and the line of the broken row


# ---------------------------------------------------------------- labels against the heads
@st.composite
def broken_labels(draw):
    """(task, rows, bad line) for the encoder pool: expert "two" has 2 labels, "three" 3."""
    task = draw(st.sampled_from(["two", "three"]))
    k = 2 if task == "two" else 3
    n = draw(st.integers(1, 5))
    labels = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    at = draw(st.integers(0, n - 1))
    how = draw(st.sampled_from(["out_of_range", "float", "negative", "wrong_type", "empty_text"]))
    rows = [{"sentence": "w1 w2", "label": lab} for lab in labels]
    if how == "out_of_range":
        rows[at]["label"] = k + draw(st.integers(0, 10**6))
    elif how == "float":
        rows[at]["label"] = draw(st.integers(0, k - 1)) + draw(st.sampled_from([0.5, 0.25, 0.0]))
    elif how == "negative":
        rows[at]["label"] = -draw(st.integers(1, 100))
    elif how == "wrong_type":
        rows[at]["label"] = draw(
            st.one_of(st.text(max_size=3), st.none(), st.booleans(), st.lists(st.integers(), max_size=1))
        )
    else:
        rows[at]["sentence"] = draw(st.sampled_from(["", "  "]))
    return task, rows, at + 1


@FUZZ
@given(case=broken_labels())
def test_broken_labels_are_one_error_line(pools, sentinels, case):
    task, rows, bad_line = case
    good = {"two": [{"sentence": "w3", "label": 1}], "three": [{"sentence": "w4", "label": 2}]}
    good[task] = rows
    with tempfile.TemporaryDirectory() as work:
        os.mkdir(os.path.join(work, "calib"))
        files = {
            f"calib/{t}.jsonl": "".join(json.dumps(r) + "\n" for r in rs).encode() for t, rs in good.items()
        }
        recipe = fw_recipe(
            pools["enc_base"],
            [pools["two"], pools["three"]],
            os.path.join(work, "calib"),
            per_model=[{"task": "two"}, {"task": "three"}],
        )
        line = run_broken(recipe, files, work)
    assert f"{task}.jsonl:{bad_line}:" in line, line


# ---------------------------------------------------------------- broken recipes
@st.composite
def broken_recipe(draw, pools, calib):
    recipe = {
        "merge_method": "fw_merging",
        "base_model": str(pools["base"]),
        "models": [{"model": str(m)} for m in pools["experts"]],
        "parameters": {"calibration": calib, "iterations": 1},
        "dtype": "float32",
    }
    how = draw(
        st.sampled_from(
            [
                "misspelt",
                "wrong_type",
                "out_of_range",
                "duplicate",
                "non_utf8",
                "method",
                "shape",
                "missing_path",
                "empty_string",
                "per_model",
            ]
        )
    )
    if how == "misspelt":
        key = draw(st.sampled_from(["iterations", "step_size", "scaling", "calibration", "granularity"]))
        typo = key[:-1] if draw(st.booleans()) else key + draw(st.sampled_from("sxe_"))
        recipe["parameters"][typo] = 3
    elif how == "wrong_type":
        key = draw(st.sampled_from(["iterations", "step_size", "top_k", "granularity", "init"]))
        # letters that spell no number and no allowed value
        recipe["parameters"][key] = draw(
            st.one_of(
                st.text(alphabet="xyzq", min_size=1, max_size=4),
                st.lists(st.integers(), min_size=1, max_size=2),
            )
        )
    elif how == "out_of_range":
        key, value = draw(
            st.sampled_from(
                [
                    ("iterations", 0),
                    ("step_size", 0),
                    ("step_size", 1.5),
                    ("top_k", 0),
                    ("density", 0),
                    ("drop_rate", 1),
                    ("sketch_ratio", 0.5),
                    ("max_rows", 0),
                ]
            )
        )
        recipe["parameters"][key] = value
    elif how == "duplicate":
        text = yaml.safe_dump(recipe, sort_keys=False)
        key = draw(st.sampled_from(["  iterations: 1", "merge_method: fw_merging", "dtype: float32"]))
        return text.replace(key, key + "\n" + key, 1).encode()
    elif how == "non_utf8":
        text = yaml.safe_dump(recipe, sort_keys=False).encode()
        at = draw(st.integers(0, len(text)))
        return text[:at] + bytes([draw(st.integers(0x80, 0xBF))]) + text[at:]
    elif how == "method":
        recipe["merge_method"] = draw(
            st.one_of(
                st.sampled_from(["fw_merge", "FW_merging", "", "tie"]),
                st.lists(st.integers(), min_size=1, max_size=1),
                st.integers(),
            )
        )
    elif how == "shape":
        key = draw(st.sampled_from(["parameters", "models"]))
        recipe[key] = draw(
            st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.lists(st.integers(), min_size=1))
        )
    elif how == "missing_path":
        where = draw(st.sampled_from(["calibration", "base_model", "model"]))
        if where == "calibration":
            recipe["parameters"]["calibration"] = calib + ".missing"
        elif where == "base_model":
            recipe["base_model"] = str(pools["base"]) + "-missing"
        else:
            recipe["models"][0]["model"] = str(pools["experts"][0]) + "-missing"
    elif how == "empty_string":
        where = draw(st.sampled_from(["calibration", "model", "base_model"]))
        if where == "calibration":
            recipe["parameters"]["calibration"] = ""
        elif where == "model":
            recipe["models"][0]["model"] = ""
        else:
            recipe["base_model"] = ""
    else:
        recipe["models"][0]["parameters"] = draw(
            st.one_of(st.just({"wieght": 1.0}), st.integers(), st.just([1]))
        )
    return yaml.safe_dump(recipe, sort_keys=False).encode()


@FUZZ
@given(data=st.data())
def test_broken_recipes_are_one_error_line(pools, sentinels, data):
    with tempfile.TemporaryDirectory() as work:
        calib = os.path.join(work, "task.jsonl")
        recipe = data.draw(broken_recipe(pools, calib))
        rows = "".join(json.dumps(r) + "\n" for r in task_rows("copy", 3, seed=0)).encode()
        run_broken(recipe, {"task.jsonl": rows}, work)


# ---------------------------------------------------------------- broken candidates
@st.composite
def broken_candidate(draw, names):
    """(how, tensor name) for a corruption of the first expert that its headers already show."""
    how = draw(st.sampled_from(["missing", "extra", "shape", "target_modules"]))
    if how == "extra":
        return how, draw(st.sampled_from(names)).replace(".weight", "_extra.weight")
    if how == "target_modules":
        return how, draw(st.text(alphabet="abcxyz_", min_size=1, max_size=8))  # no LLaMA module is named so
    return how, draw(st.sampled_from(names))


@FUZZ
@given(data=st.data())
def test_broken_candidates_are_one_error_line(pools, sentinels, data):
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(pools["experts"][0], "model.safetensors"))
    how, name = data.draw(broken_candidate(sorted(weights)))
    with tempfile.TemporaryDirectory() as work:
        write_jsonl(os.path.join(work, "task.jsonl"), task_rows("copy", 3, seed=0))
        expert = os.path.join(work, "expert")
        shutil.copytree(pools["experts"][0], expert)
        models = [expert, pools["experts"][1]]
        if how == "missing":
            del weights[name]
        elif how == "extra":
            weights[name] = torch.zeros(3)
        elif how == "shape":
            weights[name] = weights[name].flatten()[:-1].clone()
        else:
            with open(os.path.join(expert, "adapter_config.json"), "w") as fp:
                json.dump({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj", name]}, fp)
            models = [f"{pools['base']}+{expert}", pools["experts"][1]]
        save_file(weights, os.path.join(expert, "model.safetensors"))
        line = run_broken(fw_recipe(pools["base"], models, os.path.join(work, "task.jsonl")), {}, work)
    assert name in line, line


def test_a_misspelt_key_fails_before_any_model_loads_in_import_time(pools, sentinels, tmp_path):
    """Measured: the error comes in well under a second once imported (and no model is loaded);
    a subprocess run takes about the time of importing fwllm's merge command."""
    write_jsonl(tmp_path / "task.jsonl", task_rows("copy", 3, seed=0))
    recipe = fw_recipe(pools["base"], pools["experts"], str(tmp_path / "task.jsonl")).replace(
        "iterations", "iteratons"
    )
    start = time.perf_counter()
    line = run_broken(recipe, {}, str(tmp_path))
    seconds = time.perf_counter() - start
    assert "unknown parameter 'iteratons'" in line
    assert seconds < 10.0, (
        seconds
    )  # generous for a loaded CI machine; the sentinels already prove no model loaded
