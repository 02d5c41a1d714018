"""Extensions of a frozen LM (raydapt.adapters): one table of (method x tiny family), the neutral
residue's loss on known answers, sizes, LoRA through peft, and a frozen backbone that stays frozen."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from raydapt.adapters import METHODS, AdapterConfig, adapters_of, attach, extension_loss, l1_term, load_trainable, \
    trainable_state
from raydapt.adapters.attach import backbone_parameters
from raydapt.adapters.loss import bce_term, gate_means
from raydapt.errors import UserError

FAMILIES = ("gpt2", "opt", "llama", "mistral", "qwen2")


def _extended(tiny_checkpoints, family: str, method: str, seed: int = 1, **kw):
    base = copy.deepcopy(tiny_checkpoints[family][1]).eval()
    torch.manual_seed(seed)
    model, cfg = attach(base, AdapterConfig(method=method, **kw))
    return model.eval(), cfg


def _ids(seed=0, shape=(2, 16)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_starts_bit_identical_to_the_backbone(tiny_checkpoints, family):
    ids = _ids()
    with torch.no_grad():
        reference = torch.log_softmax(tiny_checkpoints[family][1].eval()(input_ids=ids).logits, -1)
        for method in METHODS:
            model, _ = _extended(tiny_checkpoints, family, method)
            got = torch.log_softmax(model(input_ids=ids).logits, -1)
            assert torch.equal(got, reference), (family, method)


@pytest.mark.parametrize("family", FAMILIES)
def test_sizes_follow_extra_params(tiny_checkpoints, family):
    backbone = backbone_parameters(tiny_checkpoints[family][1])
    d = tiny_checkpoints[family][1].config.hidden_size
    for method in METHODS:
        model, cfg = _extended(tiny_checkpoints, family, method)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if method == "full":
            assert trainable == backbone
            continue
        assert 0.17 < trainable / backbone < 0.23, (method, trainable / backbone)
        if method == "lora":
            assert cfg.rank >= 1 and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
            continue
        adapters = adapters_of(model)
        assert len(adapters) == 4 and cfg.hidden >= 1
        a = adapters[0]
        assert a.w_i.weight.shape == a.w_g.weight.shape == (cfg.hidden, d) and a.w_o.weight.shape == (d, cfg.hidden)
        if method == "adapter":
            assert a.gate is None
        else:
            assert a.gate.weight.shape == (1, d) and (a.gate.bias is not None) == (method == "neutral-sigmoid")
    small = _extended(tiny_checkpoints, family, "neutral", extra_params=0.05)[1].hidden
    assert small < _extended(tiny_checkpoints, family, "neutral", extra_params=0.5)[1].hidden


def test_init_variances():
    from raydapt.adapters.layers import GatedResidual
    torch.manual_seed(0)
    dl = GatedResidual(256, 512, 4, init="dL")
    he = GatedResidual(256, 512, 4, init="he")
    assert float(dl.w_i.weight.var()) == pytest.approx(1 / (256 * 4), rel=0.02)
    assert float(dl.gate.weight.var()) == pytest.approx(1 / (256 * 4), rel=0.3)  # 256 draws
    assert float(he.w_g.weight.var()) == pytest.approx(2 / 256, rel=0.02)
    assert torch.count_nonzero(dl.w_o.weight) == 0


@pytest.mark.parametrize("value, field", [(0.0, "--extra-params"), (1.5, "--extra-params"), (float("nan"), "--extra-params")])
def test_extra_params_outside_0_1_is_refused(value, field):
    with pytest.raises(UserError, match=field):
        AdapterConfig(extra_params=value)
    AdapterConfig(extra_params=1.0)  # the closed end is allowed
    with pytest.raises(UserError, match="--alpha"):
        AdapterConfig(alpha=-0.01)


def test_l1_term_known_answer_counts_only_original_tokens():
    # two blocks, one row of three tokens, d = 2; tokens 0 and 1 are original-domain
    b1 = torch.tensor([[[1.0, -1.0], [2.0, 2.0], [10.0, 10.0]]])
    b2 = torch.tensor([[[3.0, 3.0], [0.0, 4.0], [5.0, -5.0]]])
    original = torch.tensor([[True, True, False]])
    # block 1: (2 + 4) / (2 * 2) = 1.5; block 2: (6 + 4) / 4 = 2.5; mean 2.0
    assert float(l1_term([b1, b2], original)) == 2.0
    b2_new = b2.clone()
    b2_new[0, 2] = 1e6  # a new-domain token's output never counts
    assert float(l1_term([b1, b2_new], original)) == 2.0
    assert float(l1_term([b1, b2], torch.zeros(1, 3, dtype=torch.bool))) == 0.0
    flat = [b.reshape(3, 2) for b in (b1, b2)]  # OPT's FFN sees (B*T, d)
    assert float(l1_term(flat, original)) == 2.0
    gate = torch.tensor([[[0.5], [0.5], [0.5]]])
    assert float(bce_term([gate], original)) == pytest.approx(float(torch.log(torch.tensor(2.0))))


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_extension_loss_adds_alpha_times_l1_on_original_tokens(tiny_checkpoints, family):
    model, cfg = _extended(tiny_checkpoints, family, "neutral", alpha=0.5)
    torch.manual_seed(3)
    with torch.no_grad():
        for a in adapters_of(model):
            a.w_o.weight.normal_(0, 0.1)
            a.gate.weight.abs_()  # most gates open, so the l1 is not zero by chance
    ids = _ids(shape=(2, 12))
    original = torch.zeros(2, 12, dtype=torch.bool)
    original[0] = True  # row 0 original domain, row 1 new
    out = extension_loss(model, ids, original, cfg)
    expected = l1_term([a.last_output for a in adapters_of(model)], original)
    assert float(out["aux"]) == float(expected) > 0
    assert torch.allclose(out["loss"], out["lm"] + 0.5 * expected)
    only_new = extension_loss(model, ids, torch.zeros_like(original), cfg)
    assert float(only_new["aux"]) == 0.0 and torch.equal(only_new["loss"], only_new["lm"])
    assert set(gate_means(model, original)) == {"original", "new"}
    for method in ("adapter", "neutral-no-l1"):
        m, c = _extended(tiny_checkpoints, family, method, alpha=0.5)
        assert float(extension_loss(m, ids, original, c)["aux"]) == 0.0


@pytest.mark.parametrize("method", ["neutral", "neutral-sigmoid", "adapter", "lora"])
def test_training_moves_only_the_extension(tiny_checkpoints, method):
    model, cfg = _extended(tiny_checkpoints, "llama", method)
    before = {k: v.clone() for k, v in tiny_checkpoints["llama"][1].state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    start = {k: v.clone() for k, v in trainable_state(model).items()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids, original = _ids(shape=(4, 16)), torch.tensor([True, False, False, False])[:, None].expand(4, 16)
    losses = []
    for _ in range(8):
        loss = extension_loss(model, ids, original, cfg)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    base = model.get_base_model() if method == "lora" else model
    after = {k.replace("base_layer.", ""): v for k, v in base.state_dict().items()
             if "residual_adapter" not in k and "lora_" not in k}
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert any(not torch.equal(v, start[k]) for k, v in trainable_state(model).items())
    if method == "lora":
        from peft import PeftModel
        assert isinstance(model, PeftModel)


def test_saved_adapters_load_onto_a_fresh_copy_and_refuse_another_backbone(tiny_checkpoints):
    model, cfg = _extended(tiny_checkpoints, "qwen2", "neutral")
    with torch.no_grad():
        for a in adapters_of(model):
            a.w_o.weight.normal_(0, 0.1)
    ids = _ids()
    state = {k: v.clone() for k, v in trainable_state(model).items()}
    fresh, _ = _extended(tiny_checkpoints, "qwen2", "neutral", seed=9)
    load_trainable(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    other, _ = _extended(tiny_checkpoints, "qwen2", "neutral", extra_params=0.5)
    with pytest.raises(UserError, match="another backbone"):
        load_trainable(other, state)
    gpt2, _ = _extended(tiny_checkpoints, "gpt2", "neutral")
    with pytest.raises(UserError, match="no place in this model"):
        load_trainable(gpt2, state)


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_adapters_attached_block_by_block_match_the_whole_model(tiny_checkpoints, family):
    """What a pipeline stage would do with its own blocks gives the logits of the extended model."""
    from raydapt.adapters.attach import attach_to_blocks, ffn_sites

    model, cfg = _extended(tiny_checkpoints, family, "neutral")
    with torch.no_grad():
        for a in adapters_of(model):
            a.w_o.weight.normal_(0, 0.1)
    tensors = {k: v.clone() for k, v in trainable_state(model).items()}
    plain = copy.deepcopy(tiny_checkpoints[family][1]).eval()
    blocks = [b for b, _, _ in ffn_sites(plain)]
    for part in ({0: blocks[0], 1: blocks[1]}, {2: blocks[2], 3: blocks[3]}):  # two "stages"
        attach_to_blocks(part, family, plain.config.hidden_size, cfg, tensors)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(UserError, match="do not fit"):
        attach_to_blocks({0: copy.deepcopy(blocks[0])}, family, 32, dataclasses.replace(cfg, hidden=cfg.hidden + 1),
                         tensors)
