"""TARP and TAMS (raydapt.adapters.tarp / .tams): bit-identical to the backbone at init on every tiny
family, each low-rank form against its explicit matrix, sizes, the straight-through estimator and
causality of the cell, and the bad ranks / operations refused."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from raydapt.adapters.tams import OPS, TAMSConfig, attach_tams, set_task, task_embedding, tams_cells
from raydapt.adapters.tams.layer import TAMSCell, straight_through
from raydapt.adapters.tarp import KINDS, TARPConfig, TARPDelta, attach_tarp, tarp_layers
from raydapt.adapters.tarp.attach import backbone_only, target_linears, weight_out_in
from raydapt.errors import UserError

FAMILIES = ("gpt2", "opt", "llama", "mistral", "qwen2")
LINEARS_PER_BLOCK = {"gpt2": 4, "opt": 6, "llama": 7, "mistral": 7, "qwen2": 7}


def _ids(seed=0, shape=(2, 16)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def _copy(tiny_checkpoints, family):
    return copy.deepcopy(tiny_checkpoints[family][1]).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_tarp_and_tams_start_bit_identical_to_the_backbone(tiny_checkpoints, family):
    ids = _ids()
    with torch.no_grad():
        reference = torch.log_softmax(tiny_checkpoints[family][1].eval()(input_ids=ids).logits, -1)
        for kind in KINDS:
            torch.manual_seed(1)
            model, _ = attach_tarp(_copy(tiny_checkpoints, family), TARPConfig(kind=kind, rank=4))
            assert len(tarp_layers(model)) == 4 * LINEARS_PER_BLOCK[family]
            assert torch.equal(torch.log_softmax(model(input_ids=ids).logits, -1), reference), (family, kind)
        model, _ = attach_tarp(_copy(tiny_checkpoints, family), TARPConfig(kind="dynamic", rank=4))
        model, _ = attach_tams(model, TAMSConfig())
        for hard in (False, True):
            set_task(model, task_embedding(model, ids), hard=hard)
            assert torch.equal(torch.log_softmax(model(input_ids=ids).logits, -1), reference), (family, "tams")


def _explicit(delta: TARPDelta, x: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """((Phi1 - 1) (.) W0 + Phi2) x with every Phi built as a full matrix, token by token."""
    if delta.kind == "bilinear":
        mul, add = delta.mul_u @ delta.mul_v.T, delta.add_u @ delta.add_v.T
        return x @ (mul * w0 + add).T
    if delta.kind == "kronecker":
        full = lambda p: sum(torch.kron(getattr(delta, f"{p}_h")[k], getattr(delta, f"{p}_u")[k] @  # noqa: E731
                                        getattr(delta, f"{p}_v")[k].T) for k in range(delta.n))
        return x @ (full("mul") * w0 + full("add")).T
    r, rows = delta.rank, []
    for token in x.reshape(-1, x.shape[-1]):
        s1 = (delta.mul_sigma.weight @ token / delta.d_in + delta.mul_sigma.bias).view(r, r)
        s2 = (delta.add_sigma.weight @ token / delta.d_in + delta.add_sigma.bias).view(r, r)
        w = (delta.mul_u @ s1 @ delta.mul_v.T) * w0 + delta.add_u @ s2 @ delta.add_v.T
        rows.append(w @ token)
    return torch.stack(rows).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_form_equals_its_explicit_matrix_and_moves_off_zero(kind):
    torch.manual_seed(0)
    delta = TARPDelta(16, 24, kind, rank=3, n=4)
    w0, x = torch.randn(24, 16), torch.randn(2, 5, 16)
    assert torch.count_nonzero(delta(x, w0)) == 0
    with torch.no_grad():
        for name, p in delta.named_parameters():
            p.normal_(0, 0.3)
    got, want = delta(x, w0), _explicit(delta, x, w0)
    assert got.abs().max() > 0.1 and torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_layers_get_their_weight_transposed(tiny_checkpoints):
    model, _ = attach_tarp(_copy(tiny_checkpoints, "gpt2"), TARPConfig(kind="bilinear", rank=2))
    name, conv = next((n, m) for n, m in target_linears(model) if n.endswith("attn.c_attn"))
    assert conv.weight.shape == (32, 96) and weight_out_in(conv).shape == (96, 32)
    with torch.no_grad():
        conv.tarp.mul_u.normal_(0, 0.5)
        conv.tarp.add_u.normal_(0, 0.5)
        x = torch.randn(2, 3, 32)
        w = weight_out_in(conv) * (1 + conv.tarp.phi("mul")) + conv.tarp.phi("add")  # Phi1 (.) W0 + Phi2
        assert torch.allclose(conv(x), x @ w.T + conv.bias, atol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_parameter_counts_and_only_the_difference_trains(tiny_checkpoints, kind):
    model, _ = attach_tarp(_copy(tiny_checkpoints, "llama"), TARPConfig(kind=kind, rank=4))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".tarp." in n for n in trainable)
    r, expected = 4, 0
    for _, m in target_linears(model):
        d_out, d_in = weight_out_in(m).shape
        expected += {"bilinear": 2 * r * (d_in + d_out), "kronecker": 2 * (64 + r * (d_in + d_out)),
                     "dynamic": 2 * (r * (d_in + d_out) + d_in * r * r + r * r)}[kind]
    assert sum(p.numel() for p in trainable.values()) == expected
    assert backbone_only(model) == sum(p.numel() for p in tiny_checkpoints["llama"][1].parameters())


def test_bad_ranks_are_refused_before_the_model_changes(tiny_checkpoints):
    with pytest.raises(UserError, match="--rank: must be an integer >= 1"):
        TARPConfig(rank=0)
    model = _copy(tiny_checkpoints, "llama")  # narrowest layer: k/v_proj 32 -> 16
    with pytest.raises(UserError, match=r"--rank: 17 is larger than layer .*k_proj .* accepted: 1 to 16"):
        attach_tarp(model, TARPConfig(kind="bilinear", rank=17))
    with pytest.raises(UserError, match="accepted: 1 to 4"):
        attach_tarp(model, TARPConfig(kind="kronecker", rank=5))
    assert not tarp_layers(model) and all(p.requires_grad for p in model.parameters())
    attach_tarp(model, TARPConfig(kind="bilinear", rank=16))
    with pytest.raises(UserError, match="--tarp: 'lowrank' is not one of"):
        TARPConfig(kind="lowrank")


def test_unknown_tams_operation_is_refused():
    with pytest.raises(UserError, match="--tams-ops: unknown operation 'conv7'; accepted: .*conv5"):
        TAMSConfig(ops="zero,conv7")
    assert TAMSConfig(ops="glu,conv3").op_list == ["glu", "conv3"] and len(OPS) == 6


def test_straight_through_is_one_hot_forward_and_softmax_backward():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]], requires_grad=True)
    w = straight_through(logits)
    assert torch.equal(w.detach().argmax(-1), torch.tensor([1, 0]))
    assert torch.allclose(w.detach(), F.one_hot(torch.tensor([1, 0]), 3).float(), atol=1e-7)
    g = torch.randn(2, 3)
    (w * g).sum().backward()
    reference = logits.detach().clone().requires_grad_(True)
    (torch.softmax(reference, -1) * g).sum().backward()
    assert torch.allclose(logits.grad, reference.grad)


def test_cell_is_causal_and_its_argmax_path_matches_the_supernet():
    torch.manual_seed(0)
    cell = TAMSCell(8, 6, 2, list(OPS))
    torch.nn.init.normal_(cell.p_out.weight)
    x = torch.randn(2, 7, 8)
    choice = [5, 3, 4]  # conv5, glu, conv3
    weights = F.one_hot(torch.tensor(choice), len(OPS)).float()
    y = cell(x, choice=choice)
    assert torch.allclose(y, cell(x, weights=weights), atol=1e-6)
    later = x.clone()
    later[:, 4:] += 1.0
    y2 = cell(later, choice=choice)
    assert torch.equal(y[:, :4], y2[:, :4]) and not torch.allclose(y[:, 4:], y2[:, 4:])


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_tams_trains_the_controller_through_the_straight_through_weights(tiny_checkpoints, family):
    torch.manual_seed(2)
    model, cfg = attach_tams(_copy(tiny_checkpoints, family), TAMSConfig())
    for cell in tams_cells(model):
        torch.nn.init.normal_(cell.p_out.weight, 0, 0.1)
    ids = _ids()
    choice = set_task(model, task_embedding(model, ids))
    assert len(choice) == cfg.edges == 3
    model(input_ids=ids, labels=ids).loss.backward()
    controller = model.get_submodule("tams_controller")
    assert controller.mlp[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "tams" not in n)
