"""The calibration loss: response-only cross-entropy, computed by hand."""

import torch
import torch.nn.functional as F

from conftest import task_rows, tiny_tokenizer
from fwllm.calibration import CAUSAL, CalibrationTask
from fwllm.objectives import PLAIN_HEAD_CAUSAL_LMS, batch_loss_sum, encode_tasks
from test_layerwise_gradient import tiny_llama


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
    objective = encode_tasks([CalibrationTask("copy", CAUSAL, task_rows("copy", 3, 1))], tiny_tokenizer(), model)
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
