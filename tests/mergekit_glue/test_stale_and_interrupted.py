"""Nothing stale, nothing lost: content-keyed plans and caches, interrupted and concurrent merges,
full disks and broken candidates, through `fwllm merge` and plain mergekit.

Truths used: a fresh `fwllm merge` of the current files (what a cache must never differ
from); a lone, uninterrupted merge (what interrupted or concurrent runs must end in); the
bytes a user put in a folder (what a failed run must leave as they were).
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import task_rows, write_jsonl, write_recipe
from fwllm.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
HARNESS = str(Path(__file__).with_name("interrupt_harness.py"))
# the paper's open-loop FW: its merge moves with every candidate and every calibration row, which the
# stale-plan tests need (the default FW + RegMean picks a support, and may ignore a replaced expert)
FW = {"preset": "paper", "iterations": 1, "step_size": 0.5, "scaling": 1.0}
MANIFEST = ".fwllm-output.json"
WAIT = 300  # seconds: generous, the CI box has 2 shared cores


def hook_installed():
    site = os.path.dirname(os.path.dirname(importlib.util.find_spec("mergekit").origin))
    return os.path.isfile(os.path.join(site, "fwllm_mergekit.pth"))


needs_hook = pytest.mark.skipif(
    not hook_installed() and not os.environ.get("CI"),
    reason="editable install: plain mergekit sees fwllm only through the .pth hook",
)


def fwllm(*args):
    return CliRunner().invoke(main, ["merge", *map(str, args)])


def plain_mergekit(recipe, out):
    """What `mergekit-yaml RECIPE OUT` runs, in this process (the startup hook has registered fwllm)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    text = Path(recipe).read_text()
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(text)),
        str(out),
        options=MergeOptions(quiet=True),
        config_source=text,
    )
    return out


def tensors(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def same(a, b, atol=1e-6):
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], atol=atol, rtol=0) for k in ta)


def one_error_line(result):
    assert result.exit_code != 0, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output[-3000:]
    return errors[0]


def earlier_output(out, files=None):
    """`out` as an earlier fwllm run leaves it: its files and the manifest that lists them (what
    --force may replace)."""
    out.mkdir(exist_ok=True)
    for name, text in ({"mine.txt": "precious"} if files is None else files).items():
        (out / name).write_text(text)
    listed = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    (out / MANIFEST).write_text(json.dumps({"written_by": "fwllm", "files": listed}))
    return out


def leftovers(parent, name="out"):
    return sorted(p for p in os.listdir(parent) if p.startswith(f".{name}."))


def replace_folder_keeping_stat(dst, src):
    """Put src's files into dst under dst's names, sizes (same architecture) and old mtimes, as
    `rsync -a` of a retrained expert would: only the bytes differ."""
    for name in os.listdir(dst):
        if not os.path.isfile(dst / name) or not (src / name).is_file():
            continue
        st = os.stat(dst / name)
        shutil.copyfile(src / name, dst / name)
        os.utime(dst / name, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture()
def pool(tiny_pool, tmp_path, monkeypatch):
    """Private copies of the tiny pool (tests edit them) and a private fwllm cache."""
    monkeypatch.setenv("FWLLM_CACHE", str(tmp_path / "cache"))
    for name, src in (("base", tiny_pool["base"]), *tiny_pool["experts"].items()):
        shutil.copytree(src, tmp_path / name)
    (tmp_path / "calib").mkdir()
    write_jsonl(tmp_path / "calib" / "task.jsonl", task_rows("copy", 12, seed=1))
    return tmp_path


def fw_recipe(pool, name="fw.yml", **params):
    return write_recipe(
        pool / name,
        "fw_merging",
        pool / "base",
        [pool / "copy", pool / "rev"],
        {"calibration": str(pool / "calib" / "task.jsonl"), **FW, **params},
    )


# ------------------------------------------------------------------------------- stale plans
@needs_hook
def test_plain_mergekit_never_serves_a_stale_plan(pool):
    """Edit the calibration in place, then replace an expert's folder contents: each time the next
    plain-mergekit merge equals a fresh `fwllm merge` of the new inputs and differs from the old one."""
    recipe = fw_recipe(pool)
    first = plain_mergekit(recipe, pool / "mk1")

    calib = pool / "calib" / "task.jsonl"
    st = os.stat(calib)
    write_jsonl(calib, task_rows("rev", 12, seed=1))  # same path, other rows
    os.utime(calib, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = plain_mergekit(recipe, pool / "mk2")
    assert fwllm(recipe, pool / "fresh2").exit_code == 0
    assert same(second, pool / "fresh2") and not same(second, first)

    replace_folder_keeping_stat(pool / "copy", pool / "noise")  # the expert "copy" is retrained in place
    third = plain_mergekit(recipe, pool / "mk3")
    assert fwllm(recipe, pool / "fresh3").exit_code == 0
    assert same(third, pool / "fresh3") and not same(third, second)

    plans = sorted(p for p in os.listdir(pool / "cache" / "plans") if not p.startswith("."))
    assert len(plans) == 3  # one plan per content, none reused
    for plan in plans:
        assert json.loads((pool / "cache" / "plans" / plan / "inputs.json").read_text())["calibration"][
            "files"
        ]


@needs_hook
def test_no_cache_parameter_solves_again_under_plain_mergekit(pool, monkeypatch):
    from fwllm.methods.fw_merging import FWMerging

    solves = []
    original = FWMerging.solve
    monkeypatch.setattr(
        FWMerging, "solve", lambda self, job: solves.append(job.plan_dir) or original(self, job)
    )
    plain_mergekit(fw_recipe(pool), pool / "mk1")
    plain_mergekit(fw_recipe(pool), pool / "mk2")
    assert len(solves) == 1  # the same inputs: the cached plan
    plain_mergekit(fw_recipe(pool, "nc.yml", no_cache=True), pool / "mk3")
    assert len(solves) == 2 and same(pool / "mk3", pool / "mk1")


def test_a_plan_folder_is_reused_only_for_its_own_inputs(pool, monkeypatch):
    from fwllm.methods.fw_merging import FWMerging

    solves = []
    original = FWMerging.solve
    monkeypatch.setattr(FWMerging, "solve", lambda self, job: solves.append(1) or original(self, job))
    recipe = fw_recipe(pool, plan=str(pool / "myplan"))
    assert fwllm(recipe, pool / "a").exit_code == 0
    assert (pool / "myplan" / "inputs.json").is_file() and len(solves) == 1
    assert fwllm(recipe, pool / "b").exit_code == 0 and len(solves) == 1  # reused
    assert same(pool / "a", pool / "b")

    write_jsonl(pool / "calib" / "task.jsonl", task_rows("rev", 12, seed=1))
    line = one_error_line(fwllm(recipe, pool / "c"))
    assert "was made from other inputs (calibration file task.jsonl changed)" in line and "--no-cache" in line
    assert not (pool / "c").exists() and len(solves) == 1

    assert fwllm(recipe, pool / "c", "--no-cache").exit_code == 0 and len(solves) == 2
    assert fwllm(recipe, pool / "d").exit_code == 0 and len(solves) == 2  # the new plan matches the new rows
    assert fwllm(fw_recipe(pool, "fresh.yml"), pool / "fresh").exit_code == 0
    assert same(pool / "d", pool / "fresh") and not same(pool / "d", pool / "a")


def cached(out):
    """Per candidate: did the plan take its statistic from the cache?"""
    return [c["cached"] for c in json.loads((out / "fwllm_plan" / "plan.json").read_text())["candidates"]]


def test_no_cache_recomputes_cached_statistics(pool):
    models = [pool / "copy", pool / "rev"]
    recipe = write_recipe(
        pool / "regmean.yml",
        "regmean",
        pool / "base",
        models,
        {"calibration": str(pool / "calib"), "max_rows": 4},
        per_model=[{"task": "task"}] * 2,
    )
    assert fwllm(recipe, pool / "f1").exit_code == 0 and cached(pool / "f1") == [False, False]
    assert fwllm(recipe, pool / "f2").exit_code == 0 and cached(pool / "f2") == [True, True]
    assert fwllm(recipe, pool / "f3", "--no-cache").exit_code == 0 and cached(pool / "f3") == [False, False]
    replace_folder_keeping_stat(pool / "rev", pool / "noise")  # same names, sizes, mtimes
    assert fwllm(recipe, pool / "f4").exit_code == 0 and cached(pool / "f4") == [True, False]


def lora_adapter(base_dir, out, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(out)
    return out


def test_lora_merge_cache_follows_adapter_content(pool):
    """mergekit keys its LoRA merge cache by folder name; fwllm hands it a content-keyed folder."""
    a, b = lora_adapter(pool / "base", pool / "lora_a", 1), lora_adapter(pool / "base", pool / "lora_b", 2)
    other = lora_adapter(pool / "base", pool / "lora_c", 3)
    base = str(pool / "base")
    recipe = write_recipe(
        pool / "ta.yml",
        "task_arithmetic",
        base,
        [f"{base}+{a}", f"{base}+{b}"],
        per_model=[{"weight": 0.5}, {"weight": 0.5}],
    )
    assert fwllm(recipe, pool / "m1").exit_code == 0
    replace_folder_keeping_stat(a, other)  # the adapter is retrained in place
    assert fwllm(recipe, pool / "m2").exit_code == 0
    r = fwllm(recipe, pool / "fresh", "--lora-merge-cache", pool / "empty_cache")
    assert r.exit_code == 0, r.output
    assert same(pool / "m2", pool / "fresh") and not same(pool / "m2", pool / "m1")


# --------------------------------------------------------------------- broken candidates
def corrupt(folder, how):
    path = folder / "model.safetensors"
    t = load_file(path)
    name = "model.layers.0.mlp.up_proj.weight"
    if how in ("nan", "inf"):
        t[name][3, 5] = float(how)
    elif how == "missing":
        del t[name]
    elif how == "extra":
        t["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
    elif how == "shape":
        t[name] = t[name][:-1]
    save_file(t, path)


@pytest.mark.parametrize(
    "how, message",
    [
        ("nan", "candidate {m}: model.layers.0.mlp.up_proj.weight holds 1 NaN/inf value(s)"),
        ("inf", "candidate {m}: model.layers.0.mlp.up_proj.weight holds 1 NaN/inf value(s)"),
        ("missing", "candidate {m} lacks model.layers.0.mlp.up_proj.weight, which the base has"),
        ("extra", "candidate {m} has model.layers.0.mlp.extra.weight, which the base lacks"),
        ("shape", "candidate {m}: model.layers.0.mlp.up_proj.weight has shape (63, 32), the base (64, 32)"),
        ("target_modules", "the adapter's target_modules name 'c_attn', which the base has no module called"),
    ],
)
def test_a_broken_candidate_is_one_error_line(pool, monkeypatch, how, message):
    import transformers

    loads = []
    original = transformers.PreTrainedModel.from_pretrained.__func__
    monkeypatch.setattr(
        transformers.PreTrainedModel,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: loads.append(cls) or original(cls, *a, **k)),
    )
    if how == "target_modules":
        adapter = pool / "lora"
        shutil.copytree(pool / "noise", adapter)  # stands in for the weights: refused on its config first
        config = {"peft_type": "LORA", "r": 2, "target_modules": ["c_attn"]}  # GPT-2's attention, not LLaMA's
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        models, label = [pool / "copy", f"{pool / 'base'}+{adapter}"], f"{pool / 'base'}+{adapter}"
    else:
        corrupt(pool / "rev", how)
        models, label = [pool / "copy", pool / "rev"], str(pool / "rev")
    recipe = write_recipe(
        pool / "fw.yml",
        "fw_merging",
        pool / "base",
        models,
        {"calibration": str(pool / "calib" / "task.jsonl"), **FW},
    )
    earlier_output(pool / "out")  # which --force would replace
    line = one_error_line(fwllm(recipe, pool / "out", "--force"))
    assert message.format(m=label) in line, line
    assert sorted(os.listdir(pool / "out")) == [MANIFEST, "mine.txt"] and leftovers(pool) == []
    if how not in ("nan", "inf"):  # NaN shows only in the values, which the solve reads
        assert loads == []


# --------------------------------------------------------------------------- full disk
def test_a_full_disk_during_the_tensor_write_is_one_error_and_keeps_the_old_output(pool, monkeypatch):
    import errno

    from fwllm.mergekit_glue import streaming_writer

    def full_disk(src, dst, offset, nbytes):
        dst.write(b"\0" * 1000)  # what fit before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streaming_writer, "_copy_range", full_disk)
    earlier_output(pool / "out")
    line = one_error_line(fwllm(fw_recipe(pool), pool / "out", "--force"))
    assert "no space left on device while writing" in line and "nothing was replaced" in line
    assert sorted(os.listdir(pool / "out")) == [MANIFEST, "mine.txt"]
    assert (pool / "out" / "mine.txt").read_text() == "precious"
    assert leftovers(pool) == []


def _tmpfs_in_namespace():
    if not sys.platform.startswith("linux") or not shutil.which("unshare"):
        return False
    return (
        subprocess.run(
            ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
            capture_output=True,
            timeout=60,
        ).returncode
        == 0
    )


def test_a_real_full_disk(pool):
    """OUT_DIR on a tmpfs with room for the previous output and not for a second copy (mounted in a
    private user namespace, so it needs no root)."""
    if not _tmpfs_in_namespace():
        pytest.skip("cannot mount a tmpfs here (no unprivileged user namespaces)")
    recipe = write_recipe(
        pool / "ta.yml",
        "task_arithmetic",
        pool / "base",
        [pool / "copy", pool / "rev"],
        per_model=[{"weight": 0.5}, {"weight": 0.5}],
    )
    shutil.copytree(pool / "base", pool / "previous")  # a model folder of the output's size
    earlier_output(pool / "previous", {})  # that an earlier fwllm merge wrote
    size_kib = sum(f.stat().st_size for f in (pool / "previous").iterdir()) // 1024
    disk = pool / "disk"
    disk.mkdir()
    script = (
        f"mount -t tmpfs -o size={int(size_kib * 1.5) + 8}k tmpfs {disk} && "
        f"cp -r {pool / 'previous'} {disk}/out && "
        f"{sys.executable} -m fwllm.cli merge {recipe} {disk}/out --force; echo rc=$?; "
        f"ls -a {disk}; cmp -s {pool / 'previous'}/model.safetensors {disk}/out/model.safetensors && echo same"
    )
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=WAIT, env=ENV
    )
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "no space left on device" in errors[0] and "Traceback" not in r.stderr, (
        r.stderr[-3000:]
    )
    assert "rc=1" in r.stdout and "same" in r.stdout, r.stdout
    assert [ln for ln in r.stdout.splitlines() if ln.startswith(".out.")] == [], r.stdout


# ------------------------------------------------------------------ signals and locks
def _wait(path, proc, seconds=WAIT):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert proc.poll() is None, f"the harness exited ({proc.returncode}) before {path}"
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def _previous_output(out):
    shutil.rmtree(out, ignore_errors=True)
    earlier_output(out)


def test_signals_at_every_stage_and_a_concurrent_merge(pool, monkeypatch):
    """One harness process runs the same `fwllm merge ... --force` again and again and is stopped
    during the solve, during the tensor write and inside the replace, with SIGINT and with SIGTERM;
    then it holds OUT_DIR's lock while a second merge tries the same folder; then it is SIGKILLed
    mid-solve. Each interrupted run leaves the previous OUT_DIR as it was (or, inside the replace,
    the complete new one), each next run gets past where the last was stopped, and every run that
    finishes equals a lone merge."""
    recipe = fw_recipe(pool)
    assert fwllm(recipe, pool / "lone").exit_code == 0
    out, control = pool / "out", pool / "control"
    control.mkdir()
    argv = ["merge", str(recipe), str(out), "--force"]
    stages = [
        (stage, sig) for stage in ("solve", "write", "rename") for sig in (signal.SIGINT, signal.SIGTERM)
    ]
    cases = [{"argv": argv, "pause": stage, "out": str(out)} for stage, _ in stages]
    cases += [{"argv": argv, "pause": "solve"}, {"argv": argv, "pause": "solve"}]  # the lock; SIGKILL
    (control / "cases.json").write_text(json.dumps(cases))
    log = open(pool / "harness.log", "w")  # a file, not a pipe: nobody reads until the end
    proc = subprocess.Popen(
        [sys.executable, HARNESS, "fwllm", str(control)],
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for i, (stage, sig) in enumerate(stages):
            _previous_output(out)
            _wait(control / f"ready-{i}", proc)
            proc.send_signal(sig)
            (control / f"go-{i}").touch()
            _wait(control / f"result-{i}.json", proc)
            result = json.loads((control / f"result-{i}.json").read_text())
            name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
            assert result["exit_code"] == (130 if sig == signal.SIGINT else 143), (stage, result)
            errors = [ln for ln in result["output"].splitlines() if ln.startswith("Error: ")]
            assert errors == [f"Error: interrupted ({name}); no unfinished output was left behind"], result[
                "output"
            ]
            if stage == "rename":  # the replace had begun: it completes, the signal is honoured after
                assert same(out, pool / "lone")
            else:
                assert sorted(os.listdir(out)) == [MANIFEST, "mine.txt"], stage
                assert (out / "mine.txt").read_text() == "precious", stage
            assert leftovers(pool) == [], (stage, leftovers(pool))
            (control / f"next-{i}").touch()

        i = len(stages)  # a second merge into the OUT_DIR the harness is writing
        _wait(control / f"ready-{i}", proc)
        with monkeypatch.context() as m:
            m.setenv("FWLLM_LOCK_TIMEOUT", "1")
            line = one_error_line(fwllm(recipe, out, "--force"))
        assert f"output folder {out} is in use by pid {proc.pid}" in line and "waited 1 s" in line
        (control / f"go-{i}").touch()
        _wait(control / f"result-{i}.json", proc)
        assert json.loads((control / f"result-{i}.json").read_text())["exit_code"] == 0
        assert same(out, pool / "lone") and leftovers(pool) == []
        (control / f"next-{i}").touch()

        _wait(control / f"ready-{i + 1}", proc)  # killed mid-solve: nothing runs to clean up
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=WAIT)
        assert [p for p in leftovers(pool) if ".partial-" in p]  # the killed run's staging folder
        assert same(out, pool / "lone")
    finally:
        proc.kill()
        proc.wait(timeout=WAIT)
        log.close()
    r = fwllm(recipe, out, "--force")  # the same command, again
    assert r.exit_code == 0, r.output
    assert leftovers(pool) == [] and same(out, pool / "lone")


@needs_hook
def test_two_plain_mergekit_runs_of_one_recipe_solve_once(pool):
    """The first run stops in its solve, holding the plan's lock, until the second is seen waiting
    for it; the second then reuses the first's plan. Both equal a lone `fwllm merge`."""
    recipe = fw_recipe(pool)
    env = {**ENV, "FWLLM_CACHE": str(pool / "cache")}
    control = pool / "control"
    control.mkdir()
    log_a, log_b = open(pool / "a.log", "w"), open(pool / "b.log", "w")
    first = subprocess.Popen(
        [sys.executable, HARNESS, "mergekit", str(control), str(recipe), str(pool / "mk_a")],
        env=env,
        stdout=log_a,
        stderr=subprocess.STDOUT,
        text=True,
    )
    second = None
    try:
        _wait(control / "ready-0", first)
        second = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), str(recipe), str(pool / "mk_b")],
            env=env,
            stdout=log_b,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + WAIT
        while "waiting for plan folder" not in (pool / "b.log").read_text():
            assert second.poll() is None, (pool / "b.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        (control / "go-0").touch()
        first.wait(timeout=WAIT)
        second.wait(timeout=WAIT)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
        log_a.close()
        log_b.close()
    out_a, out_b = (pool / "a.log").read_text(), (pool / "b.log").read_text()
    assert first.returncode == 0 and second.returncode == 0, (out_a[-2000:], out_b[-2000:])
    assert (out_a + out_b).count("solving into") == 1, (out_a[-2000:], out_b[-2000:])
    assert fwllm(recipe, pool / "lone").exit_code == 0
    assert same(pool / "mk_a", pool / "lone") and same(pool / "mk_b", pool / "lone")
