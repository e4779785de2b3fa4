"""Model-only memorization scores on a perfectly memorizing model (the empirical denoiser of 4 training images):
training images rank above held-out ones; and the score runs on a real MemSepPipeline's output."""

import pytest
import torch
from diffusers import DDPMScheduler
from sklearn.metrics import roc_auc_score

from diffusers_memsep import MemSepPipeline
from diffusers_memsep.memorization.features import load_digits_dataset
from diffusers_memsep.memorization.model_score import memorization_score, score_generator
from diffusers_memsep.trainer import make_dit


class EmpiricalEpsilon(torch.nn.Module):
    """The exact minimiser of the DDPM loss on ``train``: predicts the noise as if x_0 were the posterior mean."""

    def __init__(self, train, alphas_cumprod):
        super().__init__()
        self.register_buffer("points", train)
        self.register_buffer("alphas", alphas_cumprod)

    @property
    def device(self):
        return self.points.device

    @property
    def dtype(self):
        return self.points.dtype

    def forward(self, x_t, timestep, class_labels=None):
        alpha = self.alphas[timestep].view(-1, 1)
        flat = x_t.flatten(1)
        logits = -(flat[:, None] - alpha.sqrt()[:, None] * self.points.flatten(1)[None]).square().sum(2) / (
            2 * (1 - alpha))
        denoised = logits.softmax(1) @ self.points.flatten(1)
        eps = (flat - alpha.sqrt() * denoised) / (1 - alpha).sqrt()
        return type("Output", (), {"sample": eps.view_as(x_t)})()


class MemorizingPipe:
    """What memorization_score uses of a pipeline, around the empirical denoiser."""

    vae = None
    null_class = 1

    def __init__(self, train):
        self.scheduler = DDPMScheduler()
        self.transformer = EmpiricalEpsilon(train, self.scheduler.alphas_cumprod)

    def match_image_shape(self, images):
        return images


@pytest.mark.parametrize("method", ["renoise", "denoise_loss", "renoise_levels", "fixed_point"])
def test_training_images_rank_above_held_out(method):
    images = load_digits_dataset()[0]
    train, held_out = images[:4], images[100:124]
    pipe = MemorizingPipe(train)
    # slightly perturbed copies, as a sampler would produce them, against held-out digits
    copies = (train.repeat(4, 1, 1, 1) + 0.02 * torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    scores = memorization_score(pipe, torch.cat([copies, held_out]), method=method, value_range="-11").score
    labels = torch.cat([torch.ones(16), torch.zeros(24)])
    assert roc_auc_score(labels.numpy(), scores.numpy()) >= 0.95


def test_score_on_pipeline_output():
    torch.manual_seed(0)
    pipe = MemSepPipeline(transformer=make_dit(num_layers=1, num_attention_heads=2, attention_head_dim=8),
                          scheduler=DDPMScheduler(), label_dropout_prob=1.0)
    pipe.set_progress_bar_config(disable=True)
    output = pipe(batch_size=3, num_inference_steps=2, output_type="pil", generator=torch.Generator().manual_seed(0))
    result = memorization_score(pipe, output.images)
    assert result.score.shape == (3,) and torch.isfinite(result.score).all()
    assert result.memorized.dtype == torch.bool and result.method == "renoise"
    with pytest.raises(ValueError, match="cond_gap"):
        memorization_score(pipe, output.images, method="cond_gap")
    with pytest.raises(ValueError, match="method must be one of"):
        memorization_score(pipe, output.images, method="nope")


def test_one_generator_per_image_and_the_derived_generator():
    images = load_digits_dataset()[0][:3]
    pipe = MemorizingPipe(images[:2])
    per_image = lambda seeds: [torch.Generator().manual_seed(seed) for seed in seeds]  # noqa: E731
    batch = memorization_score(pipe, images, value_range="-11", generator=per_image([0, 1, 2])).score
    alone = memorization_score(pipe, images[2:], value_range="-11", generator=per_image([2])).score
    torch.testing.assert_close(batch[2:], alone)  # each image's score depends on its own generator only
    with pytest.raises(ValueError, match="one generator per image"):
        memorization_score(pipe, images, value_range="-11", generator=per_image([0, 1]))
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    derived = score_generator(generator)
    assert torch.equal(generator.get_state(), state)  # read, not advanced
    assert torch.equal(derived.get_state(), score_generator(torch.Generator().manual_seed(0)).get_state())
    assert derived.initial_seed() != generator.initial_seed() and score_generator(None) is None


def test_iterated_renoise_keeps_copies_and_carries_novel_images_further():
    images = load_digits_dataset()[0]
    train, held_out = images[:4], images[100:116]
    pipe = MemorizingPipe(train)
    score = lambda x, **kwargs: memorization_score(pipe, x, value_range="-11", repeats=2,  # noqa: E731
                                                   generator=torch.Generator().manual_seed(3), **kwargs).score
    torch.testing.assert_close(score(held_out, iterations=1), score(held_out), rtol=0, atol=0)  # the default
    once, four_times = score(held_out), score(held_out, iterations=4)
    assert four_times.mean() < once.mean()  # a novel image drifts further from itself (onto training images)
    assert score(train, iterations=4).min() > -1e-4  # a training image is a fixed point of the map
    with pytest.raises(ValueError, match="iterations"):
        score(train, iterations=0)


def test_method_options_are_the_functions_keyword_arguments():
    from diffusers_memsep.memorization.model_score import METHOD_OPTIONS, METHODS

    assert METHOD_OPTIONS == {"renoise": ("level", "steps", "repeats", "iterations"),
                              "renoise_spread": ("level", "steps", "repeats", "iterations"),
                              "denoise_loss": ("levels", "draws"), "cond_gap": ("levels", "draws"),
                              "renoise_levels": ("levels", "steps", "repeats"), "fixed_point": ("levels", "draws")}
    assert set(METHOD_OPTIONS) == set(METHODS)


@pytest.mark.parametrize("method, kwargs, message", [
    ("renoise_levels", {"levels": ()}, "at least one level"),
    ("renoise_levels", {"levels": (0.2, 1.5)}, "must lie in"),
    ("renoise", {"repeats": 0}, "at least 1"),
    ("fixed_point", {"draws": 0}, "at least one level and one draw"),
    ("fixed_point", {"levels": (0.0,)}, "must lie in"),
])
def test_bad_arguments_of_the_new_methods(method, kwargs, message):
    images = load_digits_dataset()[0][:2]
    with pytest.raises(ValueError, match=message):
        memorization_score(MemorizingPipe(images), images, method=method, value_range="-11", **kwargs)
