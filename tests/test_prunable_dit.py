"""PrunableDiTTransformer2DModel: conversion, soft masks == physical pruning, save/load, gradients, bad input."""

import copy
import json

import pytest
import torch
from diffusers import DiTTransformer2DModel

from diffusers_memsep import PrunableDiTTransformer2DModel

from conftest import TWELVE_HEAD_CONFIG as CONFIG


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (6,), generator=generator)
    y = torch.randint(0, 10, (6,), generator=generator)
    return x, t, y


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def test_from_dit_gives_identical_outputs(stock_dit, prunable_dit, inputs):
    assert type(prunable_dit) is PrunableDiTTransformer2DModel
    assert torch.equal(run(stock_dit, inputs), run(prunable_dit, inputs))
    assert prunable_dit.heads_per_layer() == [4, 4, 4]
    assert prunable_dit.config.pruned_heads == {}


def test_constructor_equals_stock_constructor(inputs):
    torch.manual_seed(3)
    a = DiTTransformer2DModel(**CONFIG)
    torch.manual_seed(3)
    b = PrunableDiTTransformer2DModel(**CONFIG)
    assert torch.equal(run(a.eval(), inputs), run(b.eval(), inputs))


def test_soft_mask_equals_physical_pruning_over_two_rounds(prunable_dit, inputs):
    reference = run(prunable_dit, inputs)
    rounds = [{0: [1], 2: [0, 3]}, {"0": [3], 1: [2], 2: [1, 2]}]  # layer 2 ends with no head at all
    mask = torch.ones(3, 4)
    for heads in rounds:
        for layer, layer_heads in heads.items():
            mask[int(layer), layer_heads] = 0.0
        prunable_dit.set_head_mask(mask)
        soft = run(prunable_dit, inputs)
        prunable_dit.set_head_mask(None)
        prunable_dit.prune_heads(heads)
        hard = run(prunable_dit, inputs)
        torch.testing.assert_close(hard, soft, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(hard, reference, atol=1e-3), "pruning these heads must change the output"
    assert prunable_dit.config.pruned_heads == {"0": [1, 3], "1": [2], "2": [0, 1, 2, 3]}
    assert prunable_dit.heads_per_layer() == [2, 3, 0]
    assert prunable_dit.kept_heads() == [[0, 2], [0, 1, 3], []]
    # The mask keeps the original numbering after pruning: masking remaining head 2 of layer 0 still works.
    mask = torch.ones(3, 4)
    mask[0, 2] = 0.0
    prunable_dit.set_head_mask(mask)
    soft = run(prunable_dit, inputs)
    prunable_dit.set_head_mask(None)
    prunable_dit.prune_heads({0: [2]})
    torch.testing.assert_close(run(prunable_dit, inputs), soft, rtol=1e-5, atol=1e-5)


def test_physical_pruning_shrinks_projections(prunable_dit):
    attn = prunable_dit.transformer_blocks[1].attn1
    prunable_dit.prune_heads({1: [0, 3]})
    assert (attn.to_q.weight.shape, attn.to_k.bias.shape, attn.to_out[0].weight.shape) == (
        (16, 32), (16,), (32, 16))
    assert attn.heads == 2 and attn.inner_dim == 16


def test_save_load_round_trip_of_pruned_model(prunable_dit, inputs, tmp_path):
    full_parameters = prunable_dit.num_parameters()
    prunable_dit.prune_heads({0: [0, 1], 2: [0, 1, 2, 3]})
    expected = run(prunable_dit, inputs)
    prunable_dit.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["pruned_heads"] == {"0": [0, 1], "2": [0, 1, 2, 3]}
    assert saved["_class_name"] == "PrunableDiTTransformer2DModel"
    assert [p.suffix for p in tmp_path.iterdir() if p.name.startswith("diffusion")] == [".safetensors"]
    loaded = PrunableDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert torch.equal(run(loaded, inputs), expected)
    assert loaded.heads_per_layer() == [2, 4, 0]
    assert loaded.num_parameters() == prunable_dit.num_parameters() < full_parameters
    assert loaded.head_mask is None


def test_from_config_of_a_pruned_model_rebuilds_the_pruned_shapes(prunable_dit):
    prunable_dit.prune_heads({1: [3]})
    rebuilt = PrunableDiTTransformer2DModel.from_config(prunable_dit.config)
    assert rebuilt.heads_per_layer() == prunable_dit.heads_per_layer()
    shapes = {k: v.shape for k, v in prunable_dit.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_masks_are_not_saved(prunable_dit, inputs, tmp_path):
    expected = run(prunable_dit, inputs)
    prunable_dit.set_head_mask(torch.zeros(3, 4))
    prunable_dit.save_pretrained(tmp_path)
    loaded = PrunableDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert torch.equal(run(loaded, inputs), expected)


def test_gradients_reach_the_mask_over_several_batches(prunable_dit, inputs):
    mask = torch.ones(3, 4, requires_grad=True)
    prunable_dit.set_head_mask(mask)
    for _ in range(2):  # accumulate as Algorithm 2 does: the mask must survive repeated backward passes
        prunable_dit(*inputs).sample.pow(2).mean().backward()
    assert mask.grad is not None and mask.grad.shape == (3, 4)
    assert torch.all(mask.grad.abs() > 0)
    # Pruned heads get no gradient; the others still do.
    prunable_dit.set_head_mask(None)
    prunable_dit.prune_heads({1: [2]})
    mask = torch.ones(3, 4, requires_grad=True)
    prunable_dit.set_head_mask(mask)
    prunable_dit(*inputs).sample.pow(2).mean().backward()
    assert mask.grad[1, 2] == 0 and torch.all(mask.grad[1, [0, 1, 3]].abs() > 0)


def test_mask_gradient_matches_finite_difference(prunable_dit, inputs):
    prunable_dit.double()
    x, t, y = inputs
    inputs = (x.double(), t, y)
    mask = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
    prunable_dit.set_head_mask(mask)
    prunable_dit(*inputs).sample.sum().backward()
    eps = 1e-6
    for layer, head in [(0, 0), (2, 3)]:
        bumped = torch.ones(3, 4, dtype=torch.float64)
        bumped[layer, head] += eps
        prunable_dit.set_head_mask(bumped)
        upper = run(prunable_dit, inputs).sum()
        bumped[layer, head] -= 2 * eps
        lower = run(prunable_dit, inputs).sum()
        assert torch.isclose(mask.grad[layer, head], (upper - lower) / (2 * eps), rtol=1e-5)


def test_pruned_config_is_rebuilt_by_constructor(inputs):
    model = PrunableDiTTransformer2DModel(**CONFIG, pruned_heads={"1": [3, 0]})
    assert model.heads_per_layer() == [4, 2, 4]
    assert model.config.pruned_heads == {"1": [0, 3]}


@pytest.mark.parametrize(
    "heads, error, message",
    [
        ({3: [0]}, ValueError, "layer 3 is out of range"),
        ({-1: [0]}, ValueError, "out of range"),
        ({0: [4]}, ValueError, "head 4 in layer 0 is out of range"),
        ({0: [-1]}, ValueError, "out of range"),
        ({0: [1.0]}, TypeError, "not an integer"),
        ({0: [True]}, TypeError, "not an integer"),
        ({"a": [0]}, TypeError, "not an integer"),
        ({0: 1}, TypeError, "list of integers"),
        ({0: [1, 1]}, ValueError, "twice"),
        ([0, 1], TypeError, "mapping"),
    ],
)
def test_bad_prune_requests_leave_model_unchanged(prunable_dit, inputs, heads, error, message):
    prunable_dit.prune_heads({2: [1]})
    before_state = copy.deepcopy(prunable_dit.state_dict())
    before_output = run(prunable_dit, inputs)
    with pytest.raises(error, match=message):
        prunable_dit.prune_heads({1: [0], **heads} if isinstance(heads, dict) else heads)
    assert prunable_dit.config.pruned_heads == {"2": [1]}
    assert prunable_dit.heads_per_layer() == [4, 4, 3]
    assert all(torch.equal(before_state[k], v) for k, v in prunable_dit.state_dict().items())
    assert torch.equal(run(prunable_dit, inputs), before_output)


def test_pruning_a_pruned_head_is_refused(prunable_dit):
    prunable_dit.prune_heads({0: [2]})
    with pytest.raises(ValueError, match="already pruned"):
        prunable_dit.prune_heads({0: [1, 2]})
    assert prunable_dit.heads_per_layer() == [3, 4, 4]


@pytest.mark.parametrize(
    "mask, error, message",
    [
        (torch.ones(3, 3), ValueError, "expected"),
        (torch.ones(4, 4), ValueError, "expected"),
        (torch.ones(3, 4, dtype=torch.long), TypeError, "floating-point"),
        ([[1.0] * 4] * 3, TypeError, "torch.Tensor"),
    ],
)
def test_bad_masks_are_refused(prunable_dit, inputs, mask, error, message):
    before = run(prunable_dit, inputs)
    with pytest.raises(error, match=message):
        prunable_dit.set_head_mask(mask)
    assert prunable_dit.head_mask is None
    assert torch.equal(run(prunable_dit, inputs), before)


@pytest.mark.parametrize(
    "pruned_heads, message",
    [({"3": [0]}, "layer 3 is out of range"), ({"0": [7]}, "head 7 in layer 0 is out of range")],
)
def test_config_that_does_not_fit_is_refused(pruned_heads, message):
    with pytest.raises(ValueError, match=message):
        PrunableDiTTransformer2DModel(**CONFIG, pruned_heads=pruned_heads)


def test_from_dit_refuses_other_models():
    with pytest.raises(TypeError, match="DiTTransformer2DModel"):
        PrunableDiTTransformer2DModel.from_dit(torch.nn.Linear(2, 2))
