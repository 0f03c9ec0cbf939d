"""A LoRA pool's merge written as a peft adapter, checked through peft's own loading and merging."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_llama_base
from fwllm.core.errors import FwllmError
from fwllm.core.plan import FWPlanRecord
from fwllm.io.adapters import AdapterReader
from fwllm.mergekit_glue.lora_adapter import task_arithmetic_factors, write_lora_merge
from fwllm.kernels.low_rank import LowRank
from fwllm.kernels.regmean_reduced import RegMeanSums

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = {"qv": 2, "all": 3}


@pytest.fixture(scope="module")
def pool(tmp_path_factory, one_thread):
    """A tiny LLaMA base and two random peft LoRA adapters: r=2 on q/v, r=3 on every projection."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora_out")
    base = save_tiny_llama_base(root)
    adapters = {}
    for seed, (name, targets, alpha) in enumerate((("qv", ["q_proj", "v_proj"], 4), ("all", ALL, 6))):
        model = get_peft_model(
            LlamaForCausalLM.from_pretrained(base),
            LoraConfig(r=RANKS[name], lora_alpha=alpha, target_modules=targets, lora_dropout=0.0),
        )
        torch.manual_seed(10 + seed)
        with torch.no_grad():
            for pname, prm in model.named_parameters():
                if "lora_" in pname:
                    prm.copy_(0.2 * torch.randn_like(prm))  # peft starts B at zero: make every delta non-zero
        model.save_pretrained(root / name)
        adapters[name] = str(root / name)
    states = {name: merged_state(base, folder) for name, folder in adapters.items()}
    return {"root": root, "base": str(base), "adapters": adapters, "states": states, "w0": base_state(base)}


def base_state(base):
    from transformers import LlamaForCausalLM

    return {k: v.detach().clone() for k, v in LlamaForCausalLM.from_pretrained(base).state_dict().items()}


def merged_state(base, adapter_dir, **load):
    """peft's own merge: PeftModel.from_pretrained(base, dir).merge_and_unload()."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter_dir, **load)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def adapted(pool):
    return sorted(set(pool_factors(pool, "all")) | set(pool_factors(pool, "qv")))


def ta_truth(pool, coefficients):
    """W_0 + sum_i c_i (W_i - W_0), with W_i peft's merged model of adapter i."""
    w0, out = pool["w0"], {}
    for name, coefs in coefficients.items():
        taus = [pool["states"][a][name] - w0[name] for a in ("qv", "all")]
        out[name] = w0[name] + sum(c * t for c, t in zip(coefs, taus))
    return out


def plan_record(pool, coefficients):
    """An FW plan over the two adapters whose steps are all task arithmetic (written by hand)."""
    return FWPlanRecord(
        method="fw_merging",
        base=pool["base"],
        settings={},
        candidates=["qv", "all"],
        weights=[1.0, 1.0],
        adapters=[pool["adapters"]["qv"], pool["adapters"]["all"]],
        atoms={n: [] for n in coefficients},
        coefficients=coefficients,
        objective={},
    )


def ta_coefficients(pool):
    """Per-tensor coefficients; layer 1's q_proj drops adapter `all`, so ranks differ: 2, 3 and 5."""
    names = adapted(pool)
    coefs = {n: [0.7, 0.4 + 0.01 * i] for i, n in enumerate(names)}
    coefs["model.layers.1.self_attn.q_proj.weight"] = [0.7, 0.0]
    coefs["model.embed_tokens.weight"] = [0.5, 0.5]  # a tensor no adapter changes: nothing to write
    return coefs


def test_fw_plan_written_as_adapter_equals_the_dense_merge(pool, tmp_path):
    coefs = ta_coefficients(pool)
    report = write_lora_merge(plan_record(pool, coefs), str(tmp_path / "ta"))
    got, truth = merged_state(pool["base"], str(tmp_path / "ta")), ta_truth(pool, coefs)
    for name, w in got.items():
        torch.testing.assert_close(w, truth.get(name, pool["w0"][name]), atol=1e-5, rtol=0)
    # rank sum r_i of the adapters used, per module (via rank_pattern), and it is the delta's true rank
    cfg = json.loads((tmp_path / "ta" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3 and cfg["base_model_name_or_path"] == pool["base"]
    for name in adapted(pool):
        used = [a for a, c in zip(("qv", "all"), coefs[name]) if c and name in pool_factors(pool, a)]
        want = sum(RANKS[a] for a in used)
        module = name[: -len(".weight")]
        assert report.ranks[name] == want == cfg["rank_pattern"].get(module, cfg["r"])
        assert cfg["alpha_pattern"].get(module, cfg["lora_alpha"]) == want  # scale 1
        assert int(torch.linalg.matrix_rank((truth[name] - pool["w0"][name]).double(), rtol=1e-5)) == want
    assert report.ranks["model.layers.1.self_attn.q_proj.weight"] == 2
    assert report.ranks["model.layers.0.self_attn.q_proj.weight"] == 5
    assert "model.embed_tokens.weight" not in report.ranks
    size = (tmp_path / "ta" / "adapter_model.safetensors").stat().st_size
    dense = sum(pool["w0"][n].numel() * 4 for n in report.ranks)
    assert report.adapter_bytes == size and report.dense_bytes == dense and size < dense
    print(report.summary())


def pool_factors(pool, adapter):
    return AdapterReader(pool["adapters"][adapter]).factors


def test_same_delta_as_peft_cat_combination(pool, tmp_path):
    """peft's add_weighted_adapter(combination_type="cat") is an independent writer of the same merge."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    weights = {"qv": 0.6, "all": -0.3}
    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(pool["base"]), pool["adapters"]["qv"], adapter_name="qv"
    )
    model.load_adapter(pool["adapters"]["all"], adapter_name="all")
    model.add_weighted_adapter(["qv", "all"], [weights["qv"], weights["all"]], "cat", combination_type="cat")
    model.set_adapter("cat")
    peft_cat = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}

    factors = {a: pool_factors(pool, a) for a in weights}
    terms = {n: [(weights[a], factors[a][n]) for a in weights if n in factors[a]] for n in adapted(pool)}
    write_lora_merge(task_arithmetic_factors(terms), str(tmp_path / "ours"), base_model=pool["base"])
    ours = merged_state(pool["base"], str(tmp_path / "ours"))
    for name, w in ours.items():
        torch.testing.assert_close(w, peft_cat[name], atol=1e-5, rtol=0)


def test_regmean_form_is_exact_where_peft_has_no_equivalent(pool, tmp_path):
    """RegMean (alpha = 1) over the two adapters, written as an adapter, is the joint least-squares
    merge of the two merged models: one Gram per layer input, shared by q/k/v and by gate/up."""
    groups = {
        "self_attn.q_proj": "attn",
        "self_attn.k_proj": "attn",
        "self_attn.v_proj": "attn",
        "self_attn.o_proj": "o",
        "mlp.gate_proj": "mlp",
        "mlp.up_proj": "mlp",
        "mlp.down_proj": "down",
    }
    factors = {a: pool_factors(pool, a) for a in ("qv", "all")}
    gen = torch.Generator().manual_seed(5)
    merged, inputs = {}, {}
    for layer in range(2):
        for group in sorted(set(groups.values())):
            names = [f"model.layers.{layer}.{m}.weight" for m, g in groups.items() if g == group]
            d_in = pool["w0"][names[0]].shape[1]
            xs = {a: torch.randn(d_in + 8, d_in, generator=gen, dtype=torch.float64) for a in factors}
            sums = RegMeanSums(alpha=1.0)
            for a, x in xs.items():
                terms = {n: factors[a][n] for n in names if n in factors[a]}
                sums.add(x.T @ x, {n: LowRank(f.a, f.b, f.scale) for n, f in terms.items()})
            delta, lam = sums.solve()
            assert lam == 0.0
            merged.update(delta)
            inputs.update({n: xs for n in names})
    assert all(isinstance(d, LowRank) for d in merged.values())
    write_lora_merge(merged, str(tmp_path / "regmean"), base_model=pool["base"])
    got = merged_state(pool["base"], str(tmp_path / "regmean"))
    for name, xs in inputs.items():
        x = torch.cat([xs["qv"], xs["all"]])
        y = torch.cat([xs[a] @ pool["states"][a][name].double().T for a in ("qv", "all")])
        truth = torch.linalg.lstsq(x, y).solution.T
        torch.testing.assert_close(got[name].double(), truth, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_truncation_is_eckart_young_optimal(pool, tmp_path, k):
    coefs = ta_coefficients(pool)
    report = write_lora_merge(plan_record(pool, coefs), str(tmp_path / f"r{k}"), rank=k)
    got, truth = merged_state(pool["base"], str(tmp_path / f"r{k}")), ta_truth(pool, coefs)
    tensors = load_file(str(tmp_path / f"r{k}" / "adapter_model.safetensors"))
    for name in adapted(pool):
        delta = (truth[name] - pool["w0"][name]).double()
        sigma = torch.linalg.svdvals(delta)
        optimal = float(sigma[k:].square().sum().sqrt() / sigma.square().sum().sqrt())
        assert report.errors[name] == pytest.approx(optimal, rel=1e-4, abs=1e-6)
        residual = got[name].double() - truth[name].double()
        written = float(torch.linalg.norm(residual) / torch.linalg.norm(delta))
        assert written == pytest.approx(optimal, rel=1e-3, abs=1e-5)  # the file holds the optimal factors
        assert tensors[f"base_model.model.{name[:-7]}.lora_A.weight"].shape[0] == report.ranks[name] <= k
    if k == 1:
        assert max(report.errors.values()) > 0.1  # rank 1 really cuts (the test can fail)
    print(report.summary())


def test_dense_term_or_a_dense_plan_is_refused_and_nothing_is_written(pool, tmp_path):
    factors = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}
    with pytest.raises(FwllmError, match="not low-rank"):
        write_lora_merge(factors, str(tmp_path / "dense"), base_model=pool["base"])
    assert not (tmp_path / "dense").exists()
    full_pool = plan_record(pool, ta_coefficients(pool)).model_copy(update={"adapters": None})
    with pytest.raises(FwllmError, match="not over a LoRA pool"):
        write_lora_merge(full_pool, str(tmp_path / "dense"))
    not_ta = plan_record(pool, ta_coefficients(pool)).model_copy(update={"coefficients": None})
    with pytest.raises(FwllmError, match="not task arithmetic"):
        write_lora_merge(not_ta, str(tmp_path / "dense"))
    assert not (tmp_path / "dense").exists()
