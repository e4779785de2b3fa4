"""Copy-free sampling in MemSepPipeline: redraws of flagged samples, early check, determinism, latent + guidance."""

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler

from diffusers_memsep import MemSepPipeline
from diffusers_memsep.pipelines.pipeline_memsep import _keep_scheduler_rows

NUM_CLASSES = 10


def tiny_dit(in_channels=1):
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
                                 out_channels=2 * in_channels, num_layers=2, sample_size=8, patch_size=2,
                                 num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=1).eval()


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=16).eval()


def make_pipe(scheduler=None, vae=None):
    pipe = MemSepPipeline(transformer=tiny_dit(in_channels=4 if vae is not None else 1),
                          scheduler=scheduler or DDIMScheduler(num_train_timesteps=100), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "output_type": "pt", **kwargs}
    generator = kwargs.pop("generator", None) or torch.Generator().manual_seed(seed)
    return pipe(generator=generator, **kwargs)


def generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def use_empirical_denoiser(pipe, known_images, rows_seen):
    """Replace the network by the exact denoiser of ``known_images``: every trajectory lands on one of them.
    ``rows_seen`` collects the batch size of every call (one denoising step per sample and call)."""
    alphas = pipe.scheduler.alphas_cumprod

    def empirical_eps(x, timestep, class_labels):
        rows_seen.append(x.shape[0])
        a = alphas[timestep[0].long()]
        d2 = (x[:, None] - a.sqrt() * known_images[None]).flatten(2).square().sum(-1)
        x0 = torch.einsum("bn,nchw->bchw", torch.softmax(-d2 / (2 * (1 - a)), dim=1), known_images)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return type("Out", (), {"sample": torch.cat([eps, eps], 1)})

    pipe.transformer.forward = empirical_eps


def images(n, seed):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_a_reference_of_its_own_samples_is_escaped_and_the_redraws_counted():
    pipe = make_pipe()
    own = sample(pipe, class_labels=[1, 2, 3])
    pipe.attach_reference(own.images * 2 - 1)
    assert sample(pipe, class_labels=[1, 2, 3]).memorized.all()  # the same seed makes the same images: copies
    free = sample(pipe, class_labels=[1, 2, 3], avoid_copies=True)
    assert not free.memorized.any() and free.num_resamples.tolist() == [1, 1, 1]
    assert (free.distance_ratio > 1 / 9).all() and free.early_distance_ratio is None
    again = sample(pipe, class_labels=[1, 2, 3], avoid_copies=True)  # the generator decides everything
    assert torch.equal(again.images, free.images) and torch.equal(again.num_resamples, free.num_resamples)
    plain = sample(pipe, class_labels=[1, 2, 3], check_memorization=True)
    assert plain.num_resamples is None and torch.equal(plain.images, own.images)  # the plain path is unchanged
    assert plain.denoising_steps.tolist() == [4, 4, 4] and free.denoising_steps.tolist() == [8, 8, 8]


def test_per_sample_generators_give_each_sample_its_own_redraws():
    pipe = make_pipe()
    own = sample(pipe, class_labels=[1, 2, 3], generator=generators(0, 1, 2))
    pipe.attach_reference(own.images * 2 - 1)
    batch = sample(pipe, class_labels=[1, 2, 3], generator=generators(0, 1, 2), avoid_copies=True)
    alone = sample(pipe, class_labels=[2], generator=generators(1), avoid_copies=True)
    assert batch.num_resamples.tolist() == [1, 1, 1] and alone.num_resamples.tolist() == [1]
    torch.testing.assert_close(alone.images, batch.images[1:2], rtol=0, atol=1e-5)


def test_a_model_that_only_makes_copies_spends_its_redraws_and_says_so():
    pipe = make_pipe()
    train = images(4, seed=3)
    pipe.attach_reference(train)
    rows = []
    use_empirical_denoiser(pipe, train, rows)
    out = sample(pipe, class_labels=[0, 0, 0], num_inference_steps=20, avoid_copies=True, max_resamples=2)
    assert out.memorized.all() and out.num_resamples.tolist() == [2, 2, 2]
    assert sum(rows) == 3 * 3 * 20  # three full trajectories per sample, then it stops
    assert out.denoising_steps.tolist() == [60, 60, 60]  # the cost the output reports is the steps that ran
    rows.clear()
    early = sample(pipe, class_labels=[0, 0, 0], num_inference_steps=20, avoid_copies=True, max_resamples=2,
                   copy_check_at=0.5)
    assert early.memorized.all() and early.num_resamples.tolist() == [2, 2, 2]
    assert sum(rows) == 3 * (10 + 10 + 20)  # two restarts at half-way, the last trajectory runs to the end
    assert early.denoising_steps.tolist() == [40, 40, 40]
    assert (early.early_distance_ratio <= 1 / 9).all()
    none_allowed = sample(pipe, class_labels=[0], num_inference_steps=20, avoid_copies=True, max_resamples=0)
    assert none_allowed.memorized.all() and none_allowed.num_resamples.tolist() == [0]


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_early_check_restarts_only_the_trajectories_headed_for_a_copy(scheduler_cls):
    # The model knows 8 images; only 4 are in the reference, so a redraw can escape to one of the other 4.
    pipe = make_pipe(scheduler=scheduler_cls(num_train_timesteps=100))
    known = images(8, seed=4)
    pipe.attach_reference(known[:4])
    rows = []
    use_empirical_denoiser(pipe, known, rows)
    kwargs = dict(class_labels=[0] * 6, num_inference_steps=10, avoid_copies=True, max_resamples=20)
    out = sample(pipe, copy_check_at=0.5, **kwargs)
    assert not out.memorized.any() and out.num_resamples.sum() > 0
    # every returned image is one of the 4 images outside the reference (a sliced multistep state would break this)
    distance = torch.cdist((out.images * 2 - 1).flatten(1), known[4:].flatten(1)).min(1).values
    assert (distance < 0.05).all(), distance
    assert torch.isfinite(out.early_distance_ratio).all()
    assert sum(rows) < 10 * (6 + int(out.num_resamples.sum()))  # restarts at half-way saved steps
    assert int(out.denoising_steps.sum()) == sum(rows)  # per sample, the steps of all its trajectories
    again = sample(pipe, copy_check_at=0.5, **kwargs)
    assert torch.equal(again.images, out.images) and torch.equal(again.num_resamples, out.num_resamples)
    end_only = sample(pipe, **kwargs)
    assert not end_only.memorized.any()


def test_scheduler_state_follows_the_rows_that_go_on():
    def run(drop_after=None):
        scheduler = DPMSolverMultistepScheduler(num_train_timesteps=100)
        scheduler.set_timesteps(6)
        x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        for index, t in enumerate(scheduler.timesteps):
            x = scheduler.step(0.1 * x + 0.05, t, x).prev_sample
            if index == drop_after:
                keep = torch.tensor([True, False, True])
                _keep_scheduler_rows(scheduler, keep, x.shape)
                x = x[keep]
        return x

    torch.testing.assert_close(run(drop_after=2), run()[[0, 2]], rtol=0, atol=0)


def test_latent_guided_batch_redraws_only_the_flagged_samples_with_their_labels():
    pipe = make_pipe(vae=tiny_vae())
    own = sample(pipe, class_labels=[1, 2, 3], guidance_scale=2.0)
    pipe.attach_reference(own.images[[0, 2]] * 2 - 1)  # samples 0 and 2 become copies, sample 1 does not
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k["class_labels"].tolist()),
                                               with_kwargs=True)
    free = sample(pipe, class_labels=[1, 2, 3], guidance_scale=2.0, avoid_copies=True, copy_check_at=0.5)
    assert free.images.shape == (3, 3, 16, 16) and not free.memorized.any()
    assert free.num_resamples.tolist() == [1, 0, 1]
    assert calls[0] == [1, 2, 3, NUM_CLASSES, NUM_CLASSES, NUM_CLASSES]
    assert [1, 3, NUM_CLASSES, NUM_CLASSES] in calls  # the redraw keeps the flagged samples' labels
    assert torch.isfinite(free.early_distance_ratio).all()  # the early x0 went through the VAE
    torch.testing.assert_close(free.images[1], own.images[1], rtol=0, atol=1e-6)  # the novel sample is kept


def test_bad_arguments_name_the_fix():
    pipe = make_pipe()
    with pytest.raises(ValueError, match=r"attach_reference.*memsep reference"):
        sample(pipe, class_labels=[1], avoid_copies=True)
    with pytest.raises(ValueError, match="copy_check_at needs the training images"):
        sample(pipe, class_labels=[1], copy_check_at=0.5)
    pipe.attach_reference(images(4, seed=0))
    for value in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_resamples"):
            sample(pipe, class_labels=[1], avoid_copies=True, max_resamples=value)
    for value in (0, 1, 1.5, True, "half"):
        with pytest.raises(ValueError, match=r"copy_check_at=.*\(0, 1\)"):
            sample(pipe, class_labels=[1], avoid_copies=True, copy_check_at=value)
    with pytest.raises(ValueError, match="check_memorization=False"):
        sample(pipe, class_labels=[1], avoid_copies=True, check_memorization=False)
    with pytest.raises(ValueError, match="avoid_copies"):
        sample(pipe, class_labels=[1], avoid_copies="yes")
