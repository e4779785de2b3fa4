"""Tests of MemSepPipeline: sampling, null class and guidance, latent space, memorization flags, save/load."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from diffusers_memsep import MemSepPipeline, MemSepPipelineOutput, NearestNeighborIndex
from diffusers_memsep.memorization.model_score import THRESHOLDS, memorization_score, score_generator

from conftest import tiny_dit

NUM_CLASSES = 10  # of conftest.tiny_dit


def train_images(n=32, shape=(1, 8, 8), seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def make_pipe(reference=True, scheduler=None, **kwargs):
    pipe = MemSepPipeline(
        transformer=tiny_dit(),
        scheduler=scheduler or DDIMScheduler(num_train_timesteps=100),
        reference=NearestNeighborIndex.from_images(train_images()) if reference else None,
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "output_type": "pt", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs)


class LabelSpy:
    """Records the class labels every transformer call receives."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append(kwargs["class_labels"].clone())


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
def test_seeded_generation_is_reproducible(scheduler_cls):
    pipe = make_pipe(scheduler=scheduler_cls(num_train_timesteps=100))
    first, second = sample(pipe, class_labels=[1, 2, 3]), sample(pipe, class_labels=[1, 2, 3])
    other = sample(pipe, seed=1, class_labels=[1, 2, 3])
    assert isinstance(first, MemSepPipelineOutput)
    assert first.images.shape == (3, 1, 8, 8) and 0 <= first.images.min() and first.images.max() <= 1
    assert torch.equal(first.images, second.images)
    assert not torch.equal(first.images, other.images)


def test_output_types_and_tuple():
    pipe = make_pipe()
    pil = sample(pipe, class_labels=2, batch_size=2, output_type="pil").images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    array = sample(pipe, class_labels=2, batch_size=2, output_type="np").images
    assert isinstance(array, np.ndarray) and array.shape == (2, 8, 8, 1)
    images, memorized, ratio, nearest = sample(pipe, class_labels=2, batch_size=2, return_dict=False)
    assert images.shape == (2, 1, 8, 8) and memorized.dtype == torch.bool and nearest.dtype == torch.int64
    assert ratio.shape == (2,)
    np.testing.assert_allclose(array[0, ..., 0], images[0, 0].numpy(), atol=0)  # same seed, same sample


def test_unconditional_uses_the_models_null_class():
    pipe = make_pipe()
    spy = LabelSpy(pipe.transformer)
    sample(pipe, batch_size=3)
    assert len(spy.calls) == 4 and all(torch.equal(c, torch.full((3,), NUM_CLASSES)) for c in spy.calls)


def test_guidance_uses_the_models_null_class_not_1000():
    pipe = make_pipe()
    spy = LabelSpy(pipe.transformer)
    guided = sample(pipe, class_labels=[3, 7], guidance_scale=4.0)
    assert all(c.tolist() == [3, 7, NUM_CLASSES, NUM_CLASSES] for c in spy.calls)
    plain = sample(pipe, class_labels=[3, 7])
    assert not torch.equal(guided.images, plain.images)  # guidance changes the result
    # guidance_scale = 1 skips the null branch entirely
    assert all(c.tolist() == [3, 7] for c in spy.calls[len(spy.calls) - 4 :])


def test_guidance_matches_manual_combination():
    # one DDIM step from pure noise: the guided eps must be eps_null + w (eps_class - eps_null), learned sigma dropped
    pipe = make_pipe(reference=False)
    w, labels = 3.0, torch.tensor([4])
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = DDIMScheduler(num_train_timesteps=100, timestep_spacing="trailing")
    pipe.scheduler = scheduler
    out = sample(pipe, class_labels=labels, guidance_scale=w, num_inference_steps=1, check_memorization=False)
    t = scheduler.timesteps[0]
    assert t == 99
    with torch.no_grad():
        eps_c = pipe.transformer(noise, timestep=t[None], class_labels=labels).sample[:, :1]
        eps_n = pipe.transformer(noise, timestep=t[None], class_labels=torch.tensor([NUM_CLASSES])).sample[:, :1]
    expected = scheduler.step(eps_n + w * (eps_c - eps_n), t, noise).prev_sample
    torch.testing.assert_close(out.images, (expected.clamp(-1, 1) / 2 + 0.5), rtol=1e-5, atol=1e-5)


def test_model_left_in_train_mode_is_sampled_in_eval_mode_and_restored():
    pipe = make_pipe()
    reference_images = sample(pipe, class_labels=[1, 2]).images
    pipe.transformer.train()  # DiT drops labels at random in train mode; the pipeline must not
    assert torch.equal(sample(pipe, class_labels=[1, 2]).images, reference_images)
    assert pipe.transformer.training


def test_memorization_flags_when_the_model_is_the_training_set():
    # Replace the network by the exact empirical denoiser of a 4-image training set: DDIM with it lands on training
    # images, so every sample must be flagged, with the index of the image it landed on.
    train = train_images(n=4)
    pipe = make_pipe()
    pipe.register_modules(reference=NearestNeighborIndex.from_images(train))
    alphas = pipe.scheduler.alphas_cumprod

    def empirical_eps(x, timestep, class_labels):
        a = alphas[timestep[0].long()]
        d2 = (x[:, None] - a.sqrt() * train[None]).flatten(2).square().sum(-1)
        weights = torch.softmax(-d2 / (2 * (1 - a)), dim=1)
        x0 = torch.einsum("bn,nchw->bchw", weights, train)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return type("Out", (), {"sample": torch.cat([eps, eps], 1)})

    pipe.transformer.forward = empirical_eps
    out = sample(pipe, class_labels=[0] * 6, num_inference_steps=20)
    assert out.memorized.all()
    copies = pipe.training_images(out.nearest_index, output_type="pt")
    torch.testing.assert_close(out.images, copies, atol=2e-3, rtol=0)
    # the untrained network's samples are noise: not copies
    assert not make_pipe().__call__(class_labels=[0] * 6, num_inference_steps=4, output_type="pt").memorized.any()


def test_no_reference_or_check_off_gives_no_flags():
    assert sample(make_pipe(reference=False), class_labels=[1]).memorized is None
    out = sample(make_pipe(), class_labels=[1], check_memorization=False)
    assert out.memorized is None and out.nearest_index is None


def test_latent_pipeline_with_tiny_autoencoder():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()
    reference = NearestNeighborIndex.from_images(train_images(shape=(3, 16, 16)))
    pipe = MemSepPipeline(
        tiny_dit(in_channels=4), DDIMScheduler(num_train_timesteps=100), vae=vae, reference=reference
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.image_shape == (3, 16, 16)
    out = sample(pipe, class_labels=[1, 2], guidance_scale=2.0)
    assert out.images.shape == (2, 3, 16, 16) and out.memorized.shape == (2,)
    with pytest.raises(ValueError, match=r"\(3, 16, 16\)"):
        MemSepPipeline(
            tiny_dit(in_channels=4), DDIMScheduler(), vae=vae, reference=NearestNeighborIndex(train_images())
        )


def test_time_routing_uses_small_t_model_below_the_switch():
    pipe = make_pipe(small_t_transformer=tiny_dit(seed=1))
    big, small = [], []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: big.append(int(k["timestep"][0])), with_kwargs=True)
    pipe.small_t_transformer.register_forward_pre_hook(
        lambda m, a, k: small.append(int(k["timestep"][0])), with_kwargs=True
    )
    routed = sample(pipe, class_labels=[1], small_t_switch=50)
    assert big and small and min(big) >= 50 and max(small) < 50 and len(big) + len(small) == 4
    big.clear(), small.clear()
    unrouted = sample(pipe, class_labels=[1])  # no switch: the main transformer only
    assert len(big) == 4 and not small and not torch.equal(routed.images, unrouted.images)
    with pytest.raises(ValueError, match="no small_t_transformer"):
        sample(make_pipe(), class_labels=[1], small_t_switch=50)
    with pytest.raises(ValueError, match="sample_size"):
        make_pipe(small_t_transformer=tiny_dit(sample_size=16))


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs():
    pipe = make_pipe()
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        sample(pipe, class_labels=[3, 10])
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        sample(pipe, class_labels=-1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample(pipe, class_labels=[1], num_inference_steps=0)
    with pytest.raises(ValueError, match="batch_size=3 but 2"):
        sample(pipe, class_labels=[1, 2], batch_size=3)
    with pytest.raises(ValueError, match="needs class_labels"):
        sample(pipe, guidance_scale=3.0)
    with pytest.raises(ValueError, match="output_type"):
        sample(pipe, class_labels=[1], output_type="latent")
    with pytest.raises(ValueError, match="channel count"):
        make_pipe(reference=False).register_modules(reference=None) or MemSepPipeline(
            tiny_dit(), DDIMScheduler(), reference=NearestNeighborIndex(train_images(shape=(3, 8, 8)))
        )
    with pytest.raises(ValueError, match="shape"):
        MemSepPipeline(tiny_dit(), DDIMScheduler(), reference=NearestNeighborIndex(train_images(shape=(1, 16, 16))))


def test_guidance_refused_without_a_learned_null_class():
    pipe = make_pipe(label_dropout_prob=0.0)
    sample(pipe, class_labels=[1])  # plain conditional sampling is fine
    with pytest.raises(ValueError, match="never learned"):
        sample(pipe, class_labels=[1], guidance_scale=2.0)
    with pytest.raises(ValueError, match="never learned"):
        sample(pipe, batch_size=1)
    # a label table without the extra null row
    no_null = make_pipe()
    for block in no_null.transformer.transformer_blocks:
        embedder = block.norm1.emb.class_embedder
        embedder.embedding_table = torch.nn.Embedding(NUM_CLASSES, embedder.embedding_table.embedding_dim)
    with pytest.raises(ValueError, match="without a null class"):
        sample(no_null, class_labels=[1], guidance_scale=2.0)
    with pytest.raises(ValueError, match="class_labels=None"):
        sample(make_pipe(label_dropout_prob=1.0), class_labels=[1])


# ------------------------------------------------------------------------------------ model-only memorization score
def test_memorization_score_fields_with_and_without_reference():
    for reference in (False, True):
        pipe = make_pipe(reference=reference)
        out = sample(pipe, batch_size=3, memorization_score=True)
        assert out.memorization_score.shape == (3,) and out.memorization_score.dtype == torch.float32
        assert torch.isfinite(out.memorization_score).all()
        assert out.score_memorized.dtype == torch.bool and out.score_memorized.shape == (3,)
        assert torch.equal(out.score_memorized, out.memorization_score >= THRESHOLDS["renoise"])
        assert (out.memorized is None) == (not reference)  # the score needs no training images
    plain = sample(make_pipe(), class_labels=[1, 2])
    assert plain.memorization_score is None and plain.score_memorized is None


def test_memorization_score_extraction_through_the_pipeline():
    """``memorization_score="extraction"`` gives what ``memorization_score`` gives on the output (seeded from the
    call's generator), and a model too young to copy falls back to renoise, with renoise's threshold."""
    pipe = make_pipe()
    options = {"num_samples": 12, "repeats": 2, "num_inference_steps": 2}
    out = pipe(class_labels=[1, 7], num_inference_steps=4, output_type="pt",
               generator=torch.Generator().manual_seed(3), memorization_score="extraction",
               memorization_score_kwargs=options)
    direct = memorization_score(pipe, out.images, class_labels=[1, 7], method="extraction",
                                generator=score_generator(torch.Generator().manual_seed(3)), **options)
    torch.testing.assert_close(out.memorization_score, direct.score)
    assert torch.equal(out.score_memorized, direct.memorized)
    assert direct.method == "renoise" and direct.num_extracted == 0  # a random model copies nothing


def test_memorization_score_leaves_the_images_bit_identical():
    pipe = make_pipe()
    for generators in (lambda: torch.Generator().manual_seed(3),
                       lambda: [torch.Generator().manual_seed(seed) for seed in (4, 5)]):
        kwargs = {"class_labels": [1, 7], "num_inference_steps": 4, "output_type": "pt"}
        off = pipe(generator=generators(), **kwargs)
        on = pipe(generator=generators(), memorization_score="denoise_loss", **kwargs)
        assert torch.equal(off.images, on.images) and torch.equal(off.distance_ratio, on.distance_ratio)
        again = pipe(generator=generators(), memorization_score="denoise_loss", **kwargs)
        assert torch.equal(on.memorization_score, again.memorization_score)  # reproducible from the seed


@pytest.mark.parametrize("method", ["renoise", "cond_gap"])
def test_memorization_score_equals_the_function_on_the_returned_images(method):
    pipe = make_pipe()
    out = sample(pipe, seed=2, class_labels=[1, 5, 8], memorization_score=method)
    expected = memorization_score(pipe, out.images, class_labels=[1, 5, 8], method=method,
                                  generator=score_generator(torch.Generator().manual_seed(2)))
    assert torch.equal(out.memorization_score, expected.score)
    assert torch.equal(out.score_memorized, expected.memorized)
    # a generator per sample: each sample's score depends on its own generator only
    pair = pipe(class_labels=[1, 5], num_inference_steps=4, output_type="pt", memorization_score=method,
                generator=[torch.Generator().manual_seed(seed) for seed in (6, 7)])
    alone = pipe(class_labels=[5], num_inference_steps=4, output_type="pt", memorization_score=method,
                 generator=[torch.Generator().manual_seed(7)])
    torch.testing.assert_close(pair.memorization_score[1:], alone.memorization_score, rtol=1e-4, atol=1e-6)


def test_memorization_score_kwargs_reach_the_score():
    pipe = make_pipe()
    out = sample(pipe, seed=2, class_labels=[1, 5], memorization_score=True,
                 memorization_score_kwargs={"repeats": 8, "iterations": 2})
    expected = memorization_score(pipe, out.images, class_labels=[1, 5], repeats=8, iterations=2,
                                  generator=score_generator(torch.Generator().manual_seed(2)))
    assert torch.equal(out.memorization_score, expected.score)
    assert not torch.equal(out.memorization_score, sample(pipe, seed=2, class_labels=[1, 5],
                                                          memorization_score=True).memorization_score)
    with pytest.raises(ValueError, match="method 'renoise' takes the options level, steps, repeats, iterations; "
                                         "got 'draws'"):
        sample(pipe, class_labels=[1], memorization_score=True, memorization_score_kwargs={"draws": 3})
    with pytest.raises(ValueError, match="memorization_score is off"):
        sample(pipe, class_labels=[1], memorization_score_kwargs={"repeats": 3})


def test_memorization_score_bad_options():
    pipe = make_pipe()
    for option in ("nope", 1, "RENOISE"):
        with pytest.raises(ValueError, match="memorization_score=.*pass True .* renoise, renoise_spread"):
            sample(pipe, class_labels=[1], memorization_score=option)
    with pytest.raises(ValueError, match="cond_gap.*pass class_labels"):
        sample(pipe, batch_size=2, memorization_score="cond_gap")
    with pytest.raises(ValueError, match="never learned"):
        sample(make_pipe(label_dropout_prob=0.0), class_labels=[1], memorization_score="cond_gap")


# ------------------------------------------------------------------------------------------------- save and load
def test_save_load_round_trip_gives_identical_images(tmp_path):
    pipe = make_pipe(scheduler=DDPMScheduler(num_train_timesteps=100), label_dropout_prob=0.1)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["reference"] == ["diffusers_memsep.memorization.index", "NearestNeighborIndex"]
    assert (tmp_path / "pipe" / "reference" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "pipe").rglob("*.bin"))  # safetensors only
    loaded = MemSepPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.label_dropout_prob == 0.1 and loaded.vae is None
    assert torch.equal(loaded.reference.images, pipe.reference.images)
    before = sample(pipe, class_labels=[1, 5], guidance_scale=2.0)
    after = sample(loaded, class_labels=[1, 5], guidance_scale=2.0)
    assert torch.equal(before.images, after.images)
    assert torch.equal(before.nearest_index, after.nearest_index)


def test_prunable_transformer_round_trip(tmp_path):
    import diffusers_memsep.models.prunable_dit as prunable_dit
    from diffusers_memsep import PrunableDiTTransformer2DModel

    # DiffusionPipeline.from_pretrained picks a component's load method by looking up `ModelMixin` in the module
    # named in model_index.json (diffusers pipeline_loading_utils.get_class_obj_and_candidates).
    assert hasattr(prunable_dit, "ModelMixin"), "prunable_dit.py must import diffusers.ModelMixin for from_pretrained"
    pruned = PrunableDiTTransformer2DModel.from_dit(tiny_dit(seed=2))
    pruned.prune_heads({0: [1]})
    pipe = make_pipe(small_t_transformer=pruned, small_t_switch=60)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = MemSepPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.small_t_transformer, PrunableDiTTransformer2DModel)
    assert loaded.config.small_t_switch == 60
    # the physically pruned weights are re-sliced at load time: same values, possibly another memory layout, so
    # float32 kernels may round differently in the last bits
    torch.testing.assert_close(
        sample(pipe, class_labels=[2]).images, sample(loaded, class_labels=[2]).images, rtol=0, atol=1e-5
    )


RESAVE_WITH_STOCK_DIFFUSERS = textwrap.dedent(
    """
    import sys
    sys.modules["diffusers_memsep"] = None  # the shipped code alone
    from diffusers import DiffusionPipeline
    load = lambda folder: DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_memsep",
                                                            trust_remote_code=True)
    load(sys.argv[1]).save_pretrained(sys.argv[2])
    pipe = load(sys.argv[2])
    assert type(pipe.transformer).__name__ == "PrunableDiTTransformer2DModel"
    import torch
    from safetensors.torch import save_file
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=2, output_type="pt", memorization_score=True,
               generator=torch.Generator().manual_seed(0))
    save_file({"images": out.images, "score": out.memorization_score, "flags": out.score_memorized}, sys.argv[3])
    """
)


def test_shipped_code_saves_a_folder_that_loads_again(tmp_path):
    from diffusers_memsep import PrunableDiTTransformer2DModel

    pipe = MemSepPipeline(PrunableDiTTransformer2DModel.from_dit(tiny_dit()), DDIMScheduler(num_train_timesteps=100))
    saved, again = tmp_path / "saved", tmp_path / "again"
    pipe.save_pretrained(saved)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    shipped = tmp_path / "shipped.safetensors"
    subprocess.run([sys.executable, "-c", RESAVE_WITH_STOCK_DIFFUSERS, str(saved), str(again), str(shipped)], env=env,
                   check=True, timeout=300, cwd=tmp_path)
    # the shipped bundle re-ships itself, byte for byte
    assert (again / "pipeline_memsep.py").read_text() == (saved / "pipeline_memsep.py").read_text()
    # and computes the model-only score offline, as the installed package does
    from safetensors.torch import load_file

    result, pipe = load_file(shipped), MemSepPipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, num_inference_steps=2, output_type="pt", memorization_score=True,
                    generator=torch.Generator().manual_seed(0))
    assert result["score"].shape == (2,) and result["flags"].dtype == torch.bool
    torch.testing.assert_close(result["images"], expected.images, rtol=0, atol=1e-6)
    torch.testing.assert_close(result["score"], expected.memorization_score, rtol=1e-5, atol=1e-7)


LOAD_BY_REPO_ID = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from diffusers_memsep import MemSepPipeline
    pipe = MemSepPipeline.from_pretrained(sys.argv[1])
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        class_labels=[1, 5], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt"
    )
    save_file({"images": out.images, "nearest_index": out.nearest_index}, sys.argv[2])
    """
)


def fake_hub_upload(cache_dir, repo_id, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay out `folder` as the Hub cache does after a download: models--owner--name/{snapshots/<commit>, refs/main}."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)


def load_offline_by_repo_id(tmp_path, cache_dir, repo_id):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache_dir), "HF_HOME": str(tmp_path / "hf_home")}
    result_file = tmp_path / "result.safetensors"
    subprocess.run(
        [sys.executable, "-c", LOAD_BY_REPO_ID, repo_id, str(result_file)], env=env, check=True, timeout=300
    )
    from safetensors.torch import load_file

    return load_file(result_file)


def test_saved_folder_pushed_then_loaded_by_repo_id_offline(tmp_path, monkeypatch):
    # No network here: the Hub side of the one push path (create_repo, upload_folder) is replaced by a copy into a
    # local Hub cache, then a fresh process with HF_HUB_OFFLINE=1 loads the pipeline by its repo id.
    import huggingface_hub.constants

    from diffusers_memsep import hub

    cache_dir, repo_id, folder = tmp_path / "hub", "someone/tiny-memsep", tmp_path / "tiny-memsep"
    cache_dir.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "create_repo", lambda *args, **kwargs: None)
    uploaded = []
    monkeypatch.setattr(hub, "upload_folder", lambda repo_id, folder_path, **kwargs: (
        uploaded.append(repo_id) or fake_hub_upload(cache_dir, repo_id, folder_path)))
    pipe = make_pipe()
    for push in (lambda: pipe.save_pretrained(folder, push_to_hub=True, repo_id=repo_id),
                 lambda: pipe.push_to_hub(repo_id)):
        with pytest.raises(ValueError, match="memsep push .* --hub_model_id"):
            push()
    assert not folder.exists() and not uploaded  # refused before anything is written
    pipe.save_pretrained(folder)
    hub.push_folder_to_hub(folder, repo_id, token="hf_fake")
    assert uploaded == [repo_id]
    loaded = load_offline_by_repo_id(tmp_path, cache_dir, repo_id)
    expected = sample(pipe, class_labels=[1, 5])
    assert torch.equal(loaded["images"], expected.images)
    assert torch.equal(loaded["nearest_index"], expected.nearest_index)


def test_learned_sigma_is_passed_to_schedulers_that_learn_the_variance():
    for variance_type, channels in (("learned_range", 2), ("fixed_small", 1)):
        pipe = make_pipe(scheduler=DDPMScheduler(num_train_timesteps=100, variance_type=variance_type))
        seen, step = [], pipe.scheduler.step
        pipe.scheduler.step = lambda model_output, *a, **k: (
            seen.append(model_output.shape[1]) or step(model_output, *a, **k)
        )
        sample(pipe, class_labels=[1, 2], guidance_scale=2.0)
        assert set(seen) == {channels}
