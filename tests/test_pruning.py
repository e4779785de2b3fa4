"""Head importance (Algorithm 2) against brute force, global selection, and one-shot pruning (Algorithm 1)."""

import copy

import pytest
import scipy.stats
import torch
from diffusers import DiTTransformer2DModel

from diffusers_memsep import PrunableDiTTransformer2DModel
from diffusers_memsep.data import TrainingData
from diffusers_memsep.pruning import (
    SMALL_TIME,
    BetaTime,
    ablation_head_importance,
    one_shot_prune,
    random_head_importance,
    select_heads_to_prune,
    small_time_head_importance,
)
from diffusers_memsep.pruning.importance import _batches
from diffusers_memsep.theory import timesteps_from_fraction
from diffusers_memsep.trainer import TrainingConfig, dsm_loss, make_noise_scheduler

from conftest import TWELVE_HEAD_CONFIG as CONFIG


@pytest.fixture
def scheduler():
    return make_noise_scheduler()


def test_beta_time_matches_scipy_and_maps_to_small_timesteps():
    u = SMALL_TIME.sample(4000, torch.Generator().manual_seed(0))
    assert scipy.stats.kstest(u.numpy(), scipy.stats.beta(0.8, 2.0).cdf).pvalue > 1e-3
    assert abs(u.mean().item() - 0.8 / 2.8) < 0.02
    k = timesteps_from_fraction(u, 1000)
    assert k.dtype == torch.long and k.min() >= 0 and k.max() <= 999
    assert (k < 500).float().mean() > 0.75  # mass on small noise
    assert timesteps_from_fraction(torch.tensor([0.0, 0.4999, 1.0]), 1000).tolist() == [0, 499, 999]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        timesteps_from_fraction(torch.tensor([1.5]), 1000)
    with pytest.raises(ValueError, match="> 0"):
        BetaTime(0.0, 2.0)


def test_small_time_importance_equals_finite_difference_brute_force(prunable_dit, training_data, scheduler):
    prunable_dit.double()
    data = TrainingData(images=training_data.images.double(), labels=training_data.labels, num_classes=10,
                        source="random")
    scores = small_time_head_importance(prunable_dit, data, scheduler, num_batches=2, batch_size=4,
                                        generator=torch.Generator().manual_seed(7))
    # Brute force on the same batch stream: S(h) = sum_batches |central difference of the loss in xi_h|.
    # (dsm_loss keeps float64 for a float64 model; step 1e-3, the central difference is O(eps^2) accurate.)
    expected = torch.zeros(3, 4, dtype=torch.float64)
    eps = 1e-3
    stream = _batches(prunable_dit, (data,), scheduler, SMALL_TIME, 2, 4, torch.Generator().manual_seed(7))
    with torch.no_grad():
        for [(images, labels)], timesteps, noise in stream:
            for layer in range(3):
                for head in range(4):
                    losses = []
                    for sign in (1, -1):
                        mask = torch.ones(3, 4, dtype=torch.float64)
                        mask[layer, head] += sign * eps
                        prunable_dit.set_head_mask(mask)
                        losses.append(dsm_loss(prunable_dit, scheduler, images, labels, timesteps,
                                               noise=noise.double()))
                    expected[layer, head] += ((losses[0] - losses[1]) / (2 * eps)).abs()
    prunable_dit.set_head_mask(None)
    torch.testing.assert_close(scores.raw_scores, expected, rtol=2e-3, atol=1e-6)
    normalised = expected / expected.pow(2).sum(dim=1, keepdim=True).sqrt()
    torch.testing.assert_close(scores.scores, normalised, rtol=2e-3, atol=1e-6)
    assert scores.method == "small_t" and scores.time_distribution == "Beta(0.8, 2)"
    assert prunable_dit.head_mask is None and all(p.requires_grad for p in prunable_dit.parameters())


def test_ablation_importance_equals_physical_removal(prunable_dit, training_data, scheduler):
    scores = ablation_head_importance(prunable_dit, training_data, scheduler, num_batches=2, batch_size=6,
                                      generator=torch.Generator().manual_seed(3))
    stream = [(*sets[0], timesteps, noise) for sets, timesteps, noise in
              _batches(prunable_dit, (training_data,), scheduler, SMALL_TIME, 2, 6, torch.Generator().manual_seed(3))]
    with torch.no_grad():
        base = [dsm_loss(prunable_dit, scheduler, *batch[:3], noise=batch[3]) for batch in stream]
        for layer, head in [(0, 0), (1, 3), (2, 2)]:
            ablated = copy.deepcopy(prunable_dit)
            ablated.prune_heads({layer: [head]})
            increase = sum(dsm_loss(ablated, scheduler, *batch[:3], noise=batch[3]) - b
                           for batch, b in zip(stream, base)) / 2
            assert torch.isclose(scores.scores[layer, head], increase.double(), rtol=1e-4, atol=1e-6)


def test_scores_of_pruned_heads_are_nan_and_never_selected(prunable_dit, training_data, scheduler):
    prunable_dit.prune_heads({1: [0, 2]})
    for scores in (small_time_head_importance(prunable_dit, training_data, scheduler, num_batches=1, batch_size=4),
                   random_head_importance(prunable_dit)):
        assert torch.isnan(scores.scores[1, [0, 2]]).all()
        assert torch.isfinite(scores.scores[1, [1, 3]]).all()
        selected = select_heads_to_prune(scores, 0.5)  # 5 of the 10 remaining heads
        assert sum(len(h) for h in selected.values()) == 5
        assert not set(selected.get(1, [])) & {0, 2}
        # per-layer normalisation runs over the remaining heads only
    alg2 = small_time_head_importance(prunable_dit, training_data, scheduler, num_batches=1, batch_size=4)
    assert torch.isclose(alg2.scores[1, [1, 3]].pow(2).sum(), torch.tensor(1.0, dtype=torch.float64))


def test_selection_is_global_lowest_floor_eta_h():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    assert select_heads_to_prune(scores, 0.5) == {0: [1], 1: [0, 2]}
    assert select_heads_to_prune(scores, 0.3) == {0: [1]}  # floor(0.3 * 6) = 1
    assert select_heads_to_prune(scores, 0.0) == {}
    ties = torch.zeros(2, 2)
    assert select_heads_to_prune(ties, 0.5) == {0: [0, 1]}  # ties break by (layer, head)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, "0.2", True])
def test_bad_eta_is_refused(ratio):
    with pytest.raises(ValueError, match="eta"):
        select_heads_to_prune(torch.rand(2, 3), ratio)


def test_eta_never_removes_the_last_head():
    scores = torch.full((2, 2), float("nan"))
    scores[0, 0] = 1.0
    assert select_heads_to_prune(scores, 0.99) == {}  # floor(0.99 * 1) = 0
    with pytest.raises(ValueError, match="no attention heads left"):
        select_heads_to_prune(torch.full((2, 2), float("nan")), 0.5)


def test_one_shot_prune_prunes_a_copy_and_fine_tunes(prunable_dit, training_data, scheduler):
    original = copy.deepcopy(prunable_dit.state_dict())
    config = TrainingConfig(max_train_steps=3, train_batch_size=8, use_ema=False, show_progress=False,
                            lr_warmup_steps=0)
    result = one_shot_prune(prunable_dit, training_data, scheduler, eta=0.25, method="small_t",
                            finetune_config=config,
                            num_batches=2, batch_size=8)
    assert sum(len(h) for h in result.pruned_heads.values()) == 3  # floor(0.25 * 12)
    assert sum(result.model.heads_per_layer()) == 9
    assert result.model.config.pruned_heads == {str(k): v for k, v in result.pruned_heads.items()}
    assert result.finetune.steps == 3 and len(result.finetune.losses) == 3
    assert all(torch.equal(original[k], v) for k, v in prunable_dit.state_dict().items()), "input model was modified"
    assert prunable_dit.heads_per_layer() == [4, 4, 4]
    # The pruned heads were the lowest-scored ones.
    scores = result.importance.scores
    kept = scores[
        torch.tensor([[h not in result.pruned_heads.get(layer, []) for h in range(4)] for layer in range(3)])
    ]
    removed = torch.stack([scores[layer, h] for layer, hs in result.pruned_heads.items() for h in hs])
    assert removed.max() <= kept.min()


def test_one_shot_prune_accepts_a_stock_dit_and_random_method(training_data, scheduler):
    torch.manual_seed(0)
    stock = DiTTransformer2DModel(**CONFIG)
    result = one_shot_prune(stock, training_data, scheduler, eta=0.5, method="random", finetune_config=None,
                            generator=torch.Generator().manual_seed(1))
    assert isinstance(result.model, PrunableDiTTransformer2DModel) and sum(result.model.heads_per_layer()) == 6
    assert result.finetune is None and result.importance.method == "random"


def test_one_shot_prune_bad_inputs_fail_before_any_work(prunable_dit, training_data, scheduler):
    with pytest.raises(TypeError, match="DiT"):
        one_shot_prune(torch.nn.Linear(2, 2), training_data, scheduler)
    with pytest.raises(ValueError, match="eta"):
        one_shot_prune(prunable_dit, training_data, scheduler, eta=1.0)
    with pytest.raises(ValueError, match="unknown pruning method"):
        one_shot_prune(prunable_dit, training_data, scheduler, method="magnitude")
    with pytest.raises(TypeError, match="from_dit"):
        small_time_head_importance(DiTTransformer2DModel(**CONFIG), training_data, scheduler)


def test_small_t_top_removes_the_most_important_heads(prunable_dit, training_data, scheduler):
    from diffusers_memsep.pruning import head_importance

    kwargs = dict(num_batches=1, batch_size=8)
    model, data = prunable_dit, training_data
    paper = head_importance("small_t", model, data, scheduler, generator=torch.Generator().manual_seed(2), **kwargs)
    top = head_importance("small_t_top", model, data, scheduler, generator=torch.Generator().manual_seed(2), **kwargs)
    assert top.method == "small_t_top" and torch.equal(top.scores, -paper.scores)
    removed = select_heads_to_prune(top, 0.25)
    highest = sorted(paper.scores.flatten().tolist(), reverse=True)[:3]
    removed_scores = sorted(float(paper.scores[layer, head]) for layer, heads in removed.items() for head in heads)
    assert removed_scores == sorted(highest)


def test_given_scores_are_reused_at_another_eta_exactly_as_if_recomputed(prunable_dit, training_data, scheduler):
    config = TrainingConfig(max_train_steps=2, train_batch_size=8, use_ema=False, show_progress=False,
                            lr_warmup_steps=0, seed=3)
    kwargs = dict(method="small_t", finetune_config=config, num_batches=2, batch_size=8)
    model, data = prunable_dit, training_data
    low = one_shot_prune(model, data, scheduler, eta=0.25, generator=torch.Generator().manual_seed(1), **kwargs)
    fresh = one_shot_prune(model, data, scheduler, eta=0.5, generator=torch.Generator().manual_seed(1), **kwargs)
    reused = one_shot_prune(model, data, scheduler, eta=0.5, importance=low.importance, **kwargs)
    assert reused.importance is low.importance and reused.pruned_heads == fresh.pruned_heads
    weights = zip(fresh.model.state_dict().values(), reused.model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in weights)
    # One score ranks the heads once: the heads removed at eta 0.25 are among those removed at eta 0.5.
    assert all(set(heads) <= set(fresh.pruned_heads.get(layer, [])) for layer, heads in low.pruned_heads.items())
    with pytest.raises(ValueError, match="layers of"):
        small = PrunableDiTTransformer2DModel(**{**CONFIG, "num_layers": 2})
        one_shot_prune(small, training_data, scheduler, eta=0.5, importance=low.importance)
