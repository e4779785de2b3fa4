"""The memorization-gap head score: a head that only helps the training images ranks first; wiring and bad input."""

import pytest
import torch

from diffusers_memsep.data import (
    TrainingData,
    TrainingDataWithHeldOut,
    held_out_from_population,
    load_training_data,
    with_held_out,
)
from diffusers_memsep.models import PrunableDiTTransformer2DModel
from diffusers_memsep.pruning import METHODS, ablation_head_importance, one_shot_prune, select_heads_to_prune
from diffusers_memsep.pruning.memorization_gap import memorization_gap_importance
from diffusers_memsep.trainer import TrainingConfig, make_dit, make_noise_scheduler


class ControlledHeads(PrunableDiTTransformer2DModel):
    """A DiT whose prediction is a sum of three per-head terms, each gated by its head mask entry:

    - head (0, 0), the memorizer (weight 0.1): the exact noise of the NEAREST TRAINING IMAGE,
      ``(x_t - alpha_t x_(1)) / sigma_t``
      (right on training images, wrong on any other image);
    - heads (0, 1) and (0, 2): ``c * sigma_t * x_t``, the ideal noise prediction for N(0, I) data, split 0.3 / 0.7
      (they help every image of the distribution alike; head 2 matters most for the ordinary loss).
    """

    def attach(self, train_images, scheduler):
        self.train_images, self.alphas_cumprod = train_images, scheduler.alphas_cumprod

    def forward(self, hidden_states, timestep=None, class_labels=None, return_dict=True):
        mask = self._head_mask if getattr(self, "_head_mask", None) is not None else torch.ones(1, 3)
        alpha_bar = self.alphas_cumprod[timestep].view(-1, 1, 1, 1).to(hidden_states.dtype)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        distances = torch.cdist((hidden_states / alpha).flatten(1), self.train_images.flatten(1))
        nearest = self.train_images[distances.argmin(dim=1)]
        memorizer = (hidden_states - alpha * nearest) / sigma
        generic = sigma * hidden_states
        prediction = 0.1 * mask[0, 0] * memorizer + (0.3 * mask[0, 1] + 0.7 * mask[0, 2]) * generic
        return (prediction,)


def controlled_setting():
    generator = torch.Generator().manual_seed(0)
    train = TrainingData(torch.randn(8, 1, 4, 4, generator=generator), None, None, "N(0, I) train")
    held_out = TrainingData(torch.randn(256, 1, 4, 4, generator=generator), None, None, "N(0, I) held out")
    scheduler = make_noise_scheduler()
    model = ControlledHeads(num_attention_heads=3, attention_head_dim=4, in_channels=1, out_channels=1, num_layers=1,
                            sample_size=4, patch_size=2, num_embeds_ada_norm=1)
    model.attach(train.images, scheduler)
    return model, train, held_out, scheduler


def test_the_head_that_only_helps_training_images_ranks_first():
    model, train, held_out, scheduler = controlled_setting()
    kwargs = dict(num_batches=8, batch_size=32, generator=torch.Generator().manual_seed(1))
    gap = memorization_gap_importance(model, train, scheduler, held_out=held_out, **kwargs)
    assert gap.method == "memorization_gap"
    assert torch.equal(gap.scores, -gap.raw_scores)
    assert select_heads_to_prune(gap, 0.34) == {0: [0]}  # floor(0.34 * 3) = 1 head: the memorizer
    assert gap.raw_scores[0, 0] > 10 * gap.raw_scores[0, 1:].abs().max()
    # The ordinary drop-one-head loss on the training set alone ranks another head as the most important one: the
    # gap, not the training loss, singles the memorizer out.
    ablation = ablation_head_importance(model, train, scheduler, **kwargs)
    assert int(ablation.scores[0].argmax()) == 2


def test_the_score_equals_the_loss_differences_computed_by_hand():
    from diffusers_memsep.pruning.importance import SMALL_TIME
    from diffusers_memsep.theory import timesteps_from_fraction
    from diffusers_memsep.trainer import dsm_loss

    model, train, held_out, scheduler = controlled_setting()
    gap = memorization_gap_importance(model, train, scheduler, held_out=held_out, num_batches=1, batch_size=16,
                                      generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)  # same draws, in the documented order
    train_images = train.images[torch.randint(0, 8, (16,), generator=generator)]
    held_images = held_out.images[torch.randint(0, 256, (16,), generator=generator)]
    timesteps = timesteps_from_fraction(SMALL_TIME.sample(16, generator), 1000)
    noise = torch.randn((16, 1, 4, 4), generator=generator)
    expected = []
    for head in range(3):
        mask = torch.ones(1, 3)
        mask[0, head] = 0

        def loss(images, head_mask):
            model.set_head_mask(head_mask)
            return dsm_loss(model, scheduler, images, None, timesteps, noise=noise).item()

        expected.append(loss(train_images, mask) - loss(train_images, None)
                        - (loss(held_images, mask) - loss(held_images, None)))
    model.set_head_mask(None)
    assert torch.allclose(gap.raw_scores[0], torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_one_shot_prune_by_memorization_gap_on_a_real_dit():
    assert "memorization_gap" in METHODS
    population = load_training_data()
    train = load_training_data(max_train_samples=16, seed=0)
    held_out = held_out_from_population(population, train)
    assert len(held_out) == len(population) - 16 and not set(held_out.indices) & set(train.indices)
    data = with_held_out(train, held_out)
    assert isinstance(data, TrainingDataWithHeldOut) and torch.equal(data.images, train.images)
    model = make_dit(num_layers=2, num_attention_heads=2, attention_head_dim=8)
    result = one_shot_prune(model, data, make_noise_scheduler(), eta=0.5, method="memorization_gap",
                            finetune_config=TrainingConfig(max_train_steps=1, train_batch_size=4, show_progress=False),
                            num_batches=1, batch_size=4)
    assert sum(len(h) for h in result.pruned_heads.values()) == 2
    assert sum(result.model.heads_per_layer()) == 2


def test_memorization_gap_without_held_out_images_fails_clearly():
    train = load_training_data(max_train_samples=16)
    with pytest.raises(ValueError, match="held-out images"):
        one_shot_prune(make_dit(num_layers=1, num_attention_heads=2, attention_head_dim=8), train,
                       make_noise_scheduler(), eta=0.5, method="memorization_gap")
    with pytest.raises(ValueError, match="whole population"):
        held_out_from_population(train, TrainingData(train.images, None, None, "all", list(range(16))))
    small = TrainingData(torch.zeros(4, 1, 4, 4), None, None, "4x4")
    with pytest.raises(ValueError, match="resolution"):
        with_held_out(train, small)
