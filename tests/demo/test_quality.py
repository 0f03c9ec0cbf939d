"""The pool-quality engine (`fwllm demo`, and the benchmark built on it) against independent
truth: bootstrap intervals against the normal closed form and scipy, the normalized-score
arithmetic by hand, choice
log-likelihoods and response NLL against a plain full-sequence forward, lambda tuning
against losses computed by hand, TIES/TA in memory against mergekit's own merge, and
dev rows disjoint from calibration (and training) rows."""

import json
import shutil
import types

import numpy as np
import pytest
import torch

from conftest import load_tensors, tiny_llama, tiny_tokenizer, write_recipe

from fwllm.core.errors import FwllmError
from fwllm.core.paths import data_root
from fwllm.demo.dev_rows import DevBudget, DevTask, check_disjoint, extend_pool_rows, pool_dev_tasks
from fwllm.demo.tuning import base_state, calibration_objective, merged_delta, tune
from fwllm.evaluation import figures as q
from fwllm.evaluation.likelihood import choice_logprobs, response_nll
from fwllm.experts import build_pool


@pytest.fixture(scope="module")
def pool(tiny_pools_root):
    return build_pool("tiny", "llama", root=tiny_pools_root, progress=False)


# -- bootstrap ------------------------------------------------------------------------------
def test_bootstrap_interval_of_a_mean_matches_the_normal_closed_form_and_scipy():
    from scipy import stats

    values = np.random.default_rng(1).normal(3.0, 2.0, size=500)
    idx = q.bootstrap_indices(len(values), 6000, seed=7)
    lo, hi = q.interval(q.RowScores(values).resampled(idx))
    half = 1.959964 * values.std() / np.sqrt(len(values))  # the plug-in sd is what the bootstrap resamples
    assert lo == pytest.approx(values.mean() - half, abs=0.08 * half)
    assert hi == pytest.approx(values.mean() + half, abs=0.08 * half)
    ref = stats.bootstrap(
        (values,),
        np.mean,
        n_resamples=6000,
        method="percentile",
        confidence_level=0.95,
        random_state=np.random.default_rng(3),
    ).confidence_interval
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=0.1 * half)


def test_bootstrap_interval_of_a_token_mean_matches_scipy_paired():
    from scipy import stats

    rng = np.random.default_rng(2)
    tokens = rng.integers(5, 60, size=300).astype(float)
    nll = tokens * rng.gamma(2.0, 0.5, size=300)  # per-row summed NLL
    idx = q.bootstrap_indices(300, 6000, seed=11)
    scores = q.RowScores(nll, tokens)
    assert scores.point() == pytest.approx(nll.sum() / tokens.sum())
    lo, hi = q.interval(scores.resampled(idx))
    ref = stats.bootstrap(
        (nll, tokens),
        lambda a, b: a.sum() / b.sum(),
        paired=True,
        vectorized=False,
        n_resamples=6000,
        method="percentile",
        random_state=np.random.default_rng(5),
    ).confidence_interval
    width = ref.high - ref.low
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=0.06 * width)


def test_resampler_is_paired_and_reproducible():
    a, b = q.Resampler(100, seed=0), q.Resampler(100, seed=0)
    assert np.array_equal(a.indices("sst2", 40), b.indices("sst2", 40))
    assert a.indices("sst2", 40) is a.indices("sst2", 40)  # every model of a task gets the same rows
    assert not np.array_equal(a.indices("sst2", 40), a.indices("rte", 40))
    # a paired difference of identical scores is exactly zero on every resample
    s = q.RowScores(np.random.default_rng(0).random(40))
    idx = a.indices("sst2", 40)
    d = q.difference(q.task_figure(s, idx), q.task_figure(s, idx))
    assert d.point == 0 and d.lo == 0 and d.hi == 0


# -- normalized scores ------------------------------------------------------------------------
def test_normalized_score_arithmetic_by_hand():
    assert q.normalized_accuracy(0.6, 0.8) == pytest.approx(75.0)
    assert q.gain_kept(2.0, 1.0, 1.25) == pytest.approx(75.0)
    assert q.gain_kept(2.0, 1.0, 2.5) == pytest.approx(-50.0)  # worse than the base
    assert np.isnan(q.gain_kept(1.0, 1.5, 1.2))  # an expert that does not beat the base defines no gain
    assert np.isnan(q.normalized_accuracy(0.5, 0.0))

    idx = np.array([[0, 1, 2, 3], [0, 0, 1, 1]])  # the full sample, then rows 0, 0, 1, 1
    merged = q.RowScores(np.array([1.0, 0.0, 1.0, 1.0]))  # 3/4; resample 2: 1/2
    expert = q.RowScores(np.array([1.0, 1.0, 1.0, 0.0]))  # 3/4; resample 2: 1
    acc = q.normalized_figure(q.ACCURACY, merged, expert, None, idx)
    assert acc.point == pytest.approx(100.0)
    assert acc.samples.tolist() == pytest.approx([100.0, 50.0])

    tok = np.array([2.0, 2.0, 2.0, 2.0])
    base = q.RowScores(np.array([4.0, 6.0, 5.0, 5.0]), tok)  # 2.5 per token; resample 2: (4+4+6+6)/8 = 2.5
    exp = q.RowScores(np.array([2.0, 2.0, 2.0, 2.0]), tok)  # 1.0
    mrg = q.RowScores(np.array([3.0, 3.0, 3.0, 3.0]), tok)  # 1.5 -> (2.5 - 1.5) / (2.5 - 1.0) = 2/3
    loss = q.normalized_figure(q.LOSS, mrg, exp, base, idx)
    assert loss.point == pytest.approx(200.0 / 3.0)
    mean = q.mean_figure([acc, loss])
    assert mean.point == pytest.approx((100.0 + 200.0 / 3.0) / 2)
    assert mean.samples.tolist() == pytest.approx([(100.0 + 200.0 / 3.0) / 2, (50.0 + 200.0 / 3.0) / 2])


def test_grid_and_pick():
    assert q.grid(0.1, 1.0, 0.1) == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert q.pick_grid_point({0.1: 2.0, 0.2: 1.5, 0.3: 1.5, 0.4: float("nan")}) == 0.2
    assert q.accuracy_rows([[0.0, -1.0], [-3.0, -1.0], [-1.0, -1.0]], [0, 0, 1]).tolist() == [1.0, 0.0, 0.0]


# -- scoring on a tiny model ------------------------------------------------------------------
def _hand_logprob(model, context, cont):
    """log p(cont | context) from one unpadded forward pass of the whole sequence."""
    ids = torch.tensor([context + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return float(sum(logp[len(context) - 1 + j, t] for j, t in enumerate(cont)))


def test_choice_loglikelihoods_and_accuracy_match_a_hand_computation():
    model, tok = tiny_llama(), tiny_tokenizer()
    rows = [
        {"prompt": "copy : 1 2 3 =", "choices": [" 1", " 2", " 3"], "gold": 0},
        {"prompt": "rev : 4 5 =", "choices": [" 5 4", " 4 5"], "gold": 1},  # multi-token choices
        {"prompt": "copy : 9 8 7 6 5 4 3 2 1 =", "choices": [" 9", " 1 2"], "gold": 1},
    ]  # truncated prompt
    got = choice_logprobs(model, tok, rows, max_prompt_tokens=6, max_batch_tokens=16)
    want = []
    for row in rows:
        context = tok(row["prompt"])["input_ids"][-6:]
        want.append(
            [
                _hand_logprob(model, context, tok(c, add_special_tokens=False)["input_ids"])
                for c in row["choices"]
            ]
        )
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
    assert q.accuracy_rows(got, [r["gold"] for r in rows]).tolist() == [
        float(int(np.argmax(w)) == r["gold"]) for w, r in zip(want, rows)
    ]


def test_response_nll_matches_a_hand_computation_and_the_calibration_objective():
    from fwllm.data.calibration import CAUSAL, CalibrationTask
    from fwllm.data.objective import encode_tasks

    model, tok = tiny_llama(), tiny_tokenizer()
    rows = [
        {"prompt": "copy : 1 2 3 =", "response": " 1 2 3"},
        {"prompt": "rev : 4 5 6 7 =", "response": " 7 6 5 4"},
        {"prompt": "copy : 8 =", "response": " 8"},
    ]
    nll, count = response_nll(model, tok, rows, max_length=64, max_batch_tokens=20)
    for row, n, c in zip(rows, nll, count):
        resp = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert c == len(resp)
        assert n == pytest.approx(-_hand_logprob(model, tok(row["prompt"])["input_ids"], resp), abs=1e-4)
    objective = encode_tasks([CalibrationTask("t", CAUSAL, rows)], tok, model, max_length=64)
    assert nll.sum() / count.sum() == pytest.approx(objective.per_task(model)["t"], rel=1e-5)


# -- tuning -------------------------------------------------------------------------------------
def _hand_calibration_loss(model, tok, files, max_rows):
    """Mean over tasks of the token-mean CE on response + eos, written out directly."""
    per_task = []
    for path in files:
        with open(path) as fp:
            rows = [json.loads(line) for line in fp if line.strip()][:max_rows]
        total, count = 0.0, 0
        for r in rows:
            resp = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            total -= _hand_logprob(model, tok(r["prompt"])["input_ids"], resp)
            count += len(resp)
        per_task.append(total / count)
    return float(np.mean(per_task))


def test_lambda_tuning_picks_the_grid_point_with_the_lowest_hand_computed_loss(pool, tmp_path):
    from fwllm.io.models import load_model, load_tokenizer

    experts = [e for e in pool.experts if e.relevant][:2]
    calib = tmp_path / "calib"
    calib.mkdir()
    files = []
    for e in experts:
        files.append(str(calib / f"{e.task}.jsonl"))
        shutil.copyfile(pool.tasks[e.task].calibration, files[-1])
    tok = load_tokenizer(pool.base)
    scales = (0.0, 0.25, 0.5, 0.75, 1.0)
    base, members = load_tensors(pool.base), [load_tensors(e.path) for e in experts]
    hand = {}
    for lam in scales:  # TA by hand: base + lambda * sum of task vectors, then the loss by hand
        model = load_model(pool.base).eval()
        model.load_state_dict(
            {k: b + lam * sum(m[k] - b for m in members) for k, b in base.items()}, strict=True
        )
        hand[lam] = _hand_calibration_loss(model, tok, files, max_rows=6)
    model = load_model(pool.base).eval()
    objective = calibration_objective(str(calib), tok, model, max_rows=6, max_length=64, batch_size=4)
    tuned, _ = tune(
        "task_arithmetic", model, base_state(model), objective, pool.base, [e.path for e in experts], scales
    )
    assert tuned.losses["1.0"] == pytest.approx(hand, rel=1e-4)
    assert tuned.scale == min(hand, key=hand.get)
    assert tuned.loss == pytest.approx(min(hand.values()), rel=1e-4)


@pytest.mark.parametrize("method,density", [("task_arithmetic", 1.0), ("ties", 0.4)])
def test_in_memory_merge_equals_mergekit_recipe(pool, tmp_path, method, density):
    """base + merged_delta equals mergekit's own merge of the same recipe at lambda 1."""
    from mergekit.options import MergeOptions

    from fwllm.mergekit_glue.merge import merge_recipe

    paths = [e.path for e in pool.experts[:3]]
    per = [{"weight": 1.0, **({"density": density} if method == "ties" else {})} for _ in paths]
    recipe = write_recipe(tmp_path / "r.yml", method, pool.base, paths, {"lambda": 1.0}, per_model=per)
    out = merge_recipe(str(recipe), str(tmp_path / "out"), MergeOptions(quiet=True))
    want, base = load_tensors(out), load_tensors(pool.base)
    delta = merged_delta(method, pool.base, paths, density)
    assert set(delta) == set(want)
    for name, d in delta.items():
        torch.testing.assert_close(base[name] + d, want[name], rtol=1e-5, atol=1e-6)


def test_in_memory_ties_skips_nothing_that_mergekit_changes(pool, tmp_path):
    """Experts that move only one tensor (as LoRA experts leave embeddings and norms alone):
    the in-memory merge still equals mergekit's, tensor for tensor."""
    from mergekit.options import MergeOptions
    from safetensors.torch import save_file

    from fwllm.mergekit_glue.merge import merge_recipe

    base = load_tensors(pool.base)
    moved = sorted(n for n in base if n.endswith("q_proj.weight"))[0]
    paths = []
    for i in range(2):
        folder = tmp_path / f"e{i}"
        shutil.copytree(pool.base, folder)
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.manual_seed(i)
        tensors = {k: v.clone() for k, v in base.items()}
        tensors[moved] = tensors[moved] + 0.1 * torch.randn_like(tensors[moved])
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        paths.append(str(folder))
    per = [{"weight": 1.0, "density": 0.3} for _ in paths]
    recipe = write_recipe(tmp_path / "r.yml", "ties", pool.base, paths, {"lambda": 1.0}, per_model=per)
    want = load_tensors(merge_recipe(str(recipe), str(tmp_path / "out"), MergeOptions(quiet=True)))
    delta = merged_delta("ties", pool.base, paths, 0.3)
    assert delta[moved].abs().sum() > 0
    for name, d in delta.items():
        torch.testing.assert_close(base[name] + d, want[name], rtol=1e-5, atol=1e-6)


def test_dare_masks_are_seeded_and_density_one_is_sign_consensus_by_hand(pool):
    """DARE draws random masks: one seed gives one delta (every lambda of a scan sees the same
    masks). At density 1 nothing is dropped, which leaves TIES' sign election, written out here."""
    paths = [e.path for e in pool.experts[:3]]
    a = merged_delta("dare_ties", pool.base, paths, 0.5, seed=3)
    b = merged_delta("dare_ties", pool.base, paths, 0.5, seed=3)
    c = merged_delta("dare_ties", pool.base, paths, 0.5, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    full = merged_delta("dare_ties", pool.base, paths, 1.0)
    base, members = load_tensors(pool.base), [load_tensors(p) for p in paths]
    for name, got in full.items():
        deltas = torch.stack([m[name] - base[name] for m in members])
        majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
        want = (deltas * (deltas.sign() == majority)).sum(0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- dev rows -----------------------------------------------------------------------------------
def test_extend_pool_rows_takes_the_source_from_the_pool_rows_on():
    source = [{"prompt": f"p{i}", "choices": [" a", " b"], "gold": i % 2} for i in range(10)]
    pool_rows = [{"prompt": "p4", "response": " a"}, {"prompt": "p5", "response": " b"}]
    assert [r["prompt"] for r in extend_pool_rows(pool_rows, source, "t")] == [f"p{i}" for i in range(4, 10)]
    with pytest.raises(FwllmError, match="contiguous"):
        extend_pool_rows([pool_rows[0], {"prompt": "p7", "response": " b"}], source, "t")
    with pytest.raises(FwllmError, match="not in the shared data"):
        extend_pool_rows([{"prompt": "p4", "response": " b"}], source, "t")  # another layout of the answer


def test_dev_rows_that_are_calibration_rows_are_refused(pool, tmp_path):
    tasks = [e.task for e in pool.experts if e.relevant]
    dev = pool_dev_tasks(pool, tasks, DevBudget())
    calibration = [pool.tasks[t].calibration for t in tasks]
    assert check_disjoint(dev, calibration) > 0
    with open(calibration[0]) as fp:
        leaked = json.loads(fp.readline())
    bad = DevTask("leak", q.LOSS, dev[0].rows + [leaked], True)
    with pytest.raises(FwllmError, match="also calibration rows"):
        check_disjoint([bad], calibration)


@pytest.mark.skipif(data_root(required=False) is None, reason="needs the shared data")
def test_smol_dev_rows_extend_the_pool_and_never_meet_training_or_calibration_rows(tmp_path):
    """Built from the smol builder's own splits (fwllm.experts.smol_data): the benchmark's dev
    rows start at the pool's dev rows and share no prompt with any expert's fit or
    calibration rows."""
    from fwllm.experts.rows import write_rows
    from fwllm.experts.smol_data import relevant_tasks

    root = data_root()
    splits = relevant_tasks(root)
    tasks = {
        n: types.SimpleNamespace(dev=write_rows(str(tmp_path / n / "dev.jsonl"), t.dev))
        for n, t in splits.items()
    }
    fake = types.SimpleNamespace(profile="smol", tasks=tasks)
    dev = {t.name: t for t in pool_dev_tasks(fake, list(splits), DevBudget(), root)}
    assert {n: len(t.rows) for n, t in dev.items()} == {"math": 319, "pubmedqa": 268, "code": 32, "sst2": 436}
    seen = {r["prompt"] for t in splits.values() for r in t.fit + t.calibration}
    for task in dev.values():
        assert not {r["prompt"] for r in task.rows} & seen, task.name
        assert len({r["prompt"] for r in task.rows}) == len(task.rows) or task.name == "sst2"


# -- settings -----------------------------------------------------------------------------------
def test_fw_overrides_reach_the_right_variant():
    from fwllm.demo.recipes import PoolSettings, recipe_for
    from fwllm.demo.settings import parse_overrides, with_fw_overrides

    fw = parse_overrides(["iterations=12", "hard.step_size=0.5", "soft.scaling=1.5", "init=ta"])
    assert fw == {"iterations": 12, "hard.step_size": 0.5, "soft.scaling": 1.5, "init": "ta"}
    merge = with_fw_overrides(PoolSettings(), fw)
    hard = recipe_for("fw_hard", "base", [], "calib", merge)["parameters"]
    soft = recipe_for("fw_soft", "base", [], "calib", merge)["parameters"]
    assert (hard["iterations"], hard["step_size"], hard["scaling"], hard["init"]) == (12, 0.5, 1.0, "ta")
    assert (soft["iterations"], soft["step_size"], soft["scaling"], soft["init"]) == (12, 0.3, 1.5, "ta")
    assert recipe_for("regmean", "base", [], "calib", merge)["parameters"].get("iterations") is None
    with pytest.raises(FwllmError, match="key=value"):
        parse_overrides(["iterations"])


def test_smol_demo_runs_the_documented_fw_settings_and_the_user_overrides_them():
    from fwllm.demo.run import demo_settings
    from fwllm.demo.recipes import recipe_for
    from fwllm.demo.settings import with_fw_overrides

    smol = demo_settings("smol", None, {"step": "open_loop"}, "cpu")
    hard = recipe_for("fw_hard", "base", [], "calib", with_fw_overrides(smol.merge, smol.fw))["parameters"]
    assert (hard["step"], hard["hull"], hard["refine"]) == ("open_loop", "adaptive", "regmean")
    assert (hard["granularity"], hard["regmean_weights"], hard["iterations"]) == ("model", "uniform", 12)
    tiny = demo_settings("tiny", None, {}, "cpu")  # the tiny pool keeps the recipe defaults
    assert (
        "step"
        not in recipe_for("fw_hard", "base", [], "calib", with_fw_overrides(tiny.merge, tiny.fw))[
            "parameters"
        ]
    )


def test_source_hash_follows_file_contents(tmp_path):
    from fwllm.demo.scores import source_hash

    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    first = source_hash(root=tmp_path)
    assert source_hash(root=tmp_path) == first
    (tmp_path / "b.py").write_text("y = 3\n")
    assert source_hash(root=tmp_path) != first


def test_scoring_dtype_auto_follows_the_hardware_and_rejects_unknown_names(monkeypatch):
    from fwllm.evaluation import likelihood as scoring

    assert scoring.scoring_dtype("float32", "cuda") == torch.float32
    assert scoring.scoring_dtype("bfloat16", "cpu") == torch.bfloat16
    assert scoring.scoring_dtype("auto", "cuda:0") == torch.bfloat16
    monkeypatch.setattr(scoring, "cpu_has_native_bf16", lambda: False)
    assert scoring.scoring_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(scoring, "cpu_has_native_bf16", lambda: True)
    assert scoring.scoring_dtype("auto", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="float16"):
        scoring.scoring_dtype("float16", "cpu")


def test_scores_of_one_dtype_are_never_served_to_another(tmp_path):
    from fwllm.demo.scores import Scorer, ScoreStore
    from fwllm.demo.settings import QualitySettings

    task = DevTask("t", q.ACCURACY, [{"prompt": "copy : 1 2 =", "choices": [" 1", " 2"], "gold": 0}], True)
    budget, tok = DevBudget(), tiny_tokenizer()
    seen = []

    def model_fn():
        model = tiny_llama()
        seen.append(model)
        return model

    for dtype in (torch.float32, torch.bfloat16):
        store = ScoreStore(str(tmp_path), budget, dtype=dtype)
        assert store.get("m", task) is None  # the float32 entry does not answer for bfloat16
        Scorer(store, tok, QualitySettings(budget=budget), lambda *_: None, dtype).scores(
            "m", [task], model_fn
        )
        assert next(seen[-1].parameters()).dtype == dtype
        assert store.get("m", task) is not None
    assert len(seen) == 2
