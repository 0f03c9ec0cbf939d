"""The calibration loss: response-only cross-entropy, computed by hand."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama, task_rows, tiny_tokenizer
from fwllm.data.calibration import CAUSAL, CalibrationTask
from fwllm.arch.kinds import PLAIN_HEAD_CAUSAL_LMS
from fwllm.data.objective import batch_loss_sum, encode_tasks


def hand_loss(model, batch):
    """Full-vocabulary logits at every position, then the loss on response tokens only."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total = torch.zeros(())
    for row in range(logits.shape[0]):
        for pos in range(logits.shape[1] - 1):
            target = int(batch["labels"][row, pos + 1])
            if target != -100:
                total = total + F.cross_entropy(logits[row, pos].float()[None], torch.tensor([target]))
    return total


def test_response_only_projection_equals_the_full_logits_loss_and_gradient():
    model = tiny_llama(layers=2)
    assert type(model).__name__ in PLAIN_HEAD_CAUSAL_LMS  # the shortcut is what is under test
    objective = encode_tasks(
        [CalibrationTask("copy", CAUSAL, task_rows("copy", 3, 1))], tiny_tokenizer(), model
    )
    batch = objective.tasks[0].batches[0]
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompts and responses
    fast = batch_loss_sum(model, CAUSAL, batch)
    fast.backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    slow = hand_loss(model, batch)
    slow.backward()
    assert torch.allclose(fast, slow, rtol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(g_fast[n], p.grad, atol=1e-6, rtol=1e-4), n


def varied_rows(n, seed=0):
    """Causal rows of different lengths (1 to 9 digits), so micro-batches need padding."""
    import random

    r = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = [str(r.randint(0, 9)) for _ in range(r.randint(1, 9))]
        rows.append({"prompt": f"copy : {' '.join(digits)} =", "response": " ".join(digits)})
    return rows


def padded_tokens(objective):
    return sum(b["input_ids"].numel() for t in objective.tasks for b in t.batches)


def test_micro_batches_group_rows_of_similar_length_and_keep_the_objective():
    model = tiny_llama(layers=2)
    tok = tiny_tokenizer()
    task = CalibrationTask("copy", CAUSAL, varied_rows(11))
    batched = encode_tasks([task], tok, model, batch_size=4)
    widths = [b["input_ids"].shape[1] for b in batched.tasks[0].batches]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) > 1
    # against file order: the same rows, in chunks of 4 as they come, padded to each chunk's longest
    lengths = [
        len(tok(r["prompt"])["input_ids"])
        + len(tok(r["response"], add_special_tokens=False)["input_ids"])
        + 1
        for r in task.rows
    ]
    in_file_order = sum(max(lengths[i : i + 4]) * len(lengths[i : i + 4]) for i in range(0, len(lengths), 4))
    assert padded_tokens(batched) <= in_file_order
    # the objective is the token mean over all rows, however they are grouped: one row at a time
    # and by hand
    single = encode_tasks([task], tok, model, batch_size=1)
    with torch.no_grad():
        by_hand = sum(float(hand_loss(model, b)) for b in single.tasks[0].batches) / single.tasks[0].units
    assert batched.tasks[0].units == single.tasks[0].units == sum(batched.tasks[0].batch_units)
    assert batched.value(model) == pytest.approx(by_hand, rel=1e-5)
    assert single.value(model) == pytest.approx(by_hand, rel=1e-5)


def two_task_objective(model, rows=(10, 6), batch_size=2):
    tasks = [CalibrationTask(f"t{k}", CAUSAL, varied_rows(n, seed=k)) for k, n in enumerate(rows)]
    return encode_tasks(tasks, tiny_tokenizer(), model, batch_size=batch_size)


def test_sampling_deals_every_micro_batch_once_per_epoch():
    objective = two_task_objective(tiny_llama(layers=1))  # 5 and 3 micro-batches
    first = objective.tasks[0]
    ids = {id(b): i for i, b in enumerate(first.batches)}
    drawn = [[ids[id(b)] for b in objective.sample(step, 2, seed=3).tasks[0].batches] for step in range(6)]
    assert [len(d) for d in drawn] == [2, 2, 1, 2, 2, 1]  # 3 windows per epoch of 5
    for epoch in (drawn[:3], drawn[3:]):
        assert sorted(i for window in epoch for i in window) == list(range(5))
    assert drawn == [
        [ids[id(b)] for b in objective.sample(step, 2, seed=3).tasks[0].batches] for step in range(6)
    ]
    assert drawn != [
        [ids[id(b)] for b in objective.sample(step, 2, seed=4).tasks[0].batches] for step in range(6)
    ]
    # a task with no more micro-batches than asked for is used whole
    assert objective.sample(0, 3, seed=3).tasks[1] is objective.tasks[1]
    assert objective.is_sampled_by(2) and objective.is_sampled_by(4) and not objective.is_sampled_by(5)
    assert not objective.is_sampled_by(0)


def test_a_sampled_objective_is_the_mean_over_the_rows_it_drew():
    model = tiny_llama(layers=2)
    objective = two_task_objective(model)
    sample = objective.sample(1, 2, seed=0)
    per_task = []
    for task in sample.tasks:
        with torch.no_grad():
            total = sum(float(hand_loss(model, b)) for b in task.batches)
        per_task.append(total / sum(int((b["labels"][:, 1:] != -100).sum()) for b in task.batches))
    assert sample.value(model) == pytest.approx(sum(per_task) / 2, rel=1e-5)
    assert sample.value(model) != pytest.approx(objective.value(model), rel=1e-6)


# -- unlabeled {"text"} rows: the mean entropy of the model's own predictions -----------------
def text_rows(words, n, seed):
    """Unlabeled rows of 1 to 7 words, so micro-batches need padding."""
    import random

    r = random.Random(seed)
    return [{"text": " ".join(r.choice(words) for _ in range(r.randint(1, 7)))} for _ in range(n)]


def entropies(logits):
    """Entropy of softmax(logits) per row of [P, C], written out: -sum_c p_c log p_c."""
    p = torch.softmax(logits.double(), dim=-1)
    return -(p * torch.log(p)).sum(-1)


def test_unlabeled_text_on_a_sequence_classifier_is_the_mean_entropy_per_row():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from conftest import ENC_WORDS, roberta_tokenizer
    from fwllm.data.calibration import UNLABELED

    cfg = RobertaConfig(
        vocab_size=len(ENC_WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
        pad_token_id=1,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(cfg).eval()
    tok = roberta_tokenizer()
    rows = text_rows(ENC_WORDS[5:], 7, seed=1)
    objective = encode_tasks([CalibrationTask("u", UNLABELED, rows)], tok, model, batch_size=3)
    assert len({b["input_ids"].shape[1] for b in objective.tasks[0].batches}) > 1  # padded batches
    # by hand: each row alone (no padding), one prediction per row
    with torch.no_grad():
        per_row = [float(entropies(model(**tok(r["text"], return_tensors="pt")).logits)[0]) for r in rows]
    assert objective.value(model) == pytest.approx(sum(per_row) / len(rows), rel=1e-5)


def test_unlabeled_text_on_a_causal_lm_is_the_mean_next_token_entropy():
    from fwllm.data.calibration import UNLABELED

    model = tiny_llama(layers=2)
    with torch.no_grad():  # sharper predictions: entropies that differ from position to position
        model.lm_head.weight.mul_(30.0)
    tok = tiny_tokenizer()
    rows = text_rows([str(d) for d in range(10)] + ["copy", "rev", "=", ":"], 9, seed=2)
    objective = encode_tasks([CalibrationTask("u", UNLABELED, rows)], tok, model, batch_size=4)
    assert len({b["input_ids"].shape[1] for b in objective.tasks[0].batches}) > 1  # padded batches
    # by hand: each row alone; position t predicts token t + 1, so a row of L tokens makes
    # L - 1 predictions (the last position predicts nothing that is there)
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = tok(r["text"], return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0]
            total += float(entropies(logits[: ids.shape[1] - 1]).sum())
            count += ids.shape[1] - 1
    assert count > 0
    assert objective.value(model) == pytest.approx(total / count, rel=1e-5)
