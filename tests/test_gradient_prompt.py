"""Gradient prompt tuning on a tiny random Llama: logits at the answer position, learning, frozen weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from raydapt.bbt.losses import accuracy
from raydapt.gradient_prompt import prompted_label_logits, tune_prompt

LABEL_IDS = [5, 9]


def _tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def _batch():
    """4 placeholder slots (id 1), 3-6 tokens, right-padded with 0; the label is the last token's parity."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(7, 11, (12,), generator=g)
    ids = torch.zeros(12, 10, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :4] = 1
        ids[i, 4:n] = torch.randint(10, 32, (int(n) - 4,), generator=g)
    labels = torch.arange(12) % 2
    ids[torch.arange(12), lengths - 1] = 20 + labels
    return ids, lengths, labels


def test_label_logits_match_the_full_forward():
    model = _tiny_model()
    ids, lengths, _ = _batch()
    full = model(input_ids=ids).logits[torch.arange(12), lengths - 1][:, LABEL_IDS]
    ours = prompted_label_logits(model, ids, lengths, None, LABEL_IDS, batch_size=5)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    zero = prompted_label_logits(model, ids, lengths, torch.zeros(4, 16), LABEL_IDS)
    torch.testing.assert_close(zero, full, rtol=1e-5, atol=1e-5)
    # The prompt is added to the placeholder slots only: it changes the answer logits.
    bumped = prompted_label_logits(model, ids, lengths, torch.ones(4, 16), LABEL_IDS)
    assert not torch.allclose(bumped, full)


def test_tuning_fits_the_train_set_and_leaves_the_model_frozen():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, lengths, labels = _batch()
    loss0 = F.cross_entropy(prompted_label_logits(model, ids, lengths, None, LABEL_IDS), labels)
    prompt = tune_prompt(model, ids, lengths, labels, LABEL_IDS, prompt_length=4, steps=60, lr=0.1, seed=0)
    logits = prompted_label_logits(model, ids, lengths, prompt, LABEL_IDS)
    assert prompt.shape == (4, 16) and not prompt.requires_grad
    assert F.cross_entropy(logits, labels) < 0.5 * loss0
    assert accuracy(logits.numpy(), labels.numpy()) >= 0.9
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())
    again = tune_prompt(model, ids, lengths, labels, LABEL_IDS, 4, steps=60, lr=0.1, seed=0)
    assert torch.equal(prompt, again)
