"""Model-only memorization scores on a perfectly memorizing model (the empirical denoiser of 4 training images):
training images rank above held-out ones; and the score runs on a real MemSepPipeline's output."""

import math

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
                              "renoise_levels": ("levels", "steps", "repeats"), "fixed_point": ("levels", "draws"),
                              "extraction": ("extracted", "num_samples", "stable_fraction", "repeats",
                                             "num_inference_steps", "min_gap", "blend_ratio", "rescue", "seed",
                                             "from_extraction")}
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


class SamplingPipe(MemorizingPipe):
    """A memorizing pipeline that also samples: each call returns ``bank`` rows drawn (seeded) with replacement, as
    ``output_type="pt"`` images in ``[0, 1]``; the empirical denoiser of ``train`` scores them."""

    config = {"label_dropout_prob": 1.0}
    num_classes = 1

    def __init__(self, train, bank):
        super().__init__(train)
        self.bank = bank

    def __call__(self, class_labels=None, batch_size=1, num_inference_steps=25, output_type="pt", generator=None):
        rows = torch.randint(len(self.bank), (batch_size,), generator=generator)
        return type("Output", (), {"images": (self.bank[rows] + 1) / 2})()


def _copies(train, per_image, scale, seed=0):
    noise = torch.randn(per_image * len(train), *train.shape[1:], generator=torch.Generator().manual_seed(seed))
    return (train.repeat(per_image, 1, 1, 1) + scale * noise).clamp(-1, 1)


def test_cluster_representatives_find_tight_clusters_and_refuse_a_cloud():
    from diffusers_memsep.memorization.model_score import _cluster_representatives

    generator = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(3, 10, generator=generator)
    points = centres.repeat_interleave(5, 0) + 0.01 * torch.randn(15, 10, generator=generator)
    stability = torch.rand(15, generator=generator)
    picked, gap = _cluster_representatives(points, stability, min_gap=2.0)
    assert gap > 100 and len(picked) == 3
    for cluster, index in enumerate(sorted(picked)):  # the most stable member of each cluster
        assert index == 5 * cluster + int(stability[5 * cluster:5 * cluster + 5].argmax())
    cloud = torch.randn(40, 50, generator=generator)  # no clusters: merge heights grow smoothly
    assert _cluster_representatives(cloud, torch.rand(40, generator=generator), min_gap=2.0)[0] == []


def test_cluster_representatives_cut_a_merged_cluster_again():
    """Two groups of three images far apart: the widest gap is between the groups, and each is cut again into its
    images, one representative each. (Two images alone in their group would be kept as one: the paper's rule calls
    each a copy of the other against the far group.)"""
    from diffusers_memsep.memorization.model_score import _cluster_representatives

    generator = torch.Generator().manual_seed(1)
    groups = 100 * torch.randn(2, 20, generator=generator)
    images = groups[[0, 0, 0, 1, 1, 1]] + 3 * torch.randn(6, 20, generator=generator)
    points = images.repeat_interleave(6, 0) + 0.3 * torch.randn(36, 20, generator=generator)
    picked, gap = _cluster_representatives(points, torch.rand(36, generator=generator), min_gap=2.0)
    assert gap > 100 and sorted(torch.cdist(points[picked], images).argmin(1).tolist()) == [0, 1, 2, 3, 4, 5]


def test_cluster_representatives_keep_one_of_two_clusters_of_one_image():
    """An image whose copies fall into two tight groups gives two clusters; the paper's rule calls one
    representative a copy of the other, and the less stable one goes."""
    from diffusers_memsep.memorization.model_score import _cluster_representatives

    generator = torch.Generator().manual_seed(2)
    centres = 10 * torch.randn(3, 20, generator=generator)
    points = centres.repeat_interleave(6, 0) + 1e-4 * torch.randn(18, 20, generator=generator)
    points[:3] += 0.1 * torch.randn(1, 20, generator=generator)  # image 0's copies in two tight groups
    stability = torch.rand(18, generator=generator)
    picked, _ = _cluster_representatives(points, stability, min_gap=2.0)
    nearest = torch.cdist(points[picked], centres).argmin(1).tolist()
    assert sorted(nearest) == [0, 1, 2] and picked[nearest.index(0)] == int(stability[:6].argmax())


def test_blend_ratio_marks_a_blend_of_two_images():
    from diffusers_memsep.memorization.model_score import _blend_ratio

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 64, generator=generator, dtype=torch.float64)
    blend = 0.4 * images[0] + 0.6 * images[1] + 0.1 * torch.randn(64, generator=generator, dtype=torch.float64)
    ratios = _blend_ratio(torch.cat([images, blend[None]]).numpy())
    assert ratios[3] > 10 and ratios[:3].max() < 2


def test_blend_ratio_equals_brute_force_in_chunks(monkeypatch):
    """The segments are taken a few pairs at a time (bounded memory for large images): same as one pair at a
    time in plain loops."""
    import numpy as np

    from diffusers_memsep.memorization import model_score

    points = np.random.default_rng(0).normal(size=(9, 30))
    expected = []
    for i in range(len(points)):
        others, best = np.delete(points, i, 0), np.inf
        for a in range(len(others)):
            for b in range(a + 1, len(others)):
                direction = others[b] - others[a]
                along = np.clip((points[i] - others[a]) @ direction / (direction @ direction), 0, 1)
                best = min(best, ((points[i] - others[a] - along * direction) ** 2).sum())
        expected.append(((others - points[i]) ** 2).sum(1).min() / best)
    monkeypatch.setattr(model_score, "SEGMENT_CHUNK_VALUES", 100)  # 3 pairs per chunk
    np.testing.assert_allclose(model_score._blend_ratio(points), expected, rtol=1e-10)


def test_extraction_drops_a_stable_blend_and_finds_the_less_stable_image(monkeypatch):
    """The two failures of a plain cut, built in: the model also reproduces a blend of its two training images (a
    stable mode of its own), and the copies of one image are far less stable than those of the other (a textured
    patch), so a bank-wide stable quarter holds none of them. Per family and with blends dropped, the two training
    images are extracted; keeping blends (``blend_ratio=inf``) extracts the blend too."""
    from diffusers_memsep.memorization.model_score import extract_training_images

    images = load_digits_dataset()[0]
    first, second = images[0], images[1]
    blend = (0.5 * first + 0.5 * second + 0.05 * torch.randn(first.shape, generator=torch.Generator().manual_seed(3)))
    modes = torch.stack([first, second, blend.clamp(-1, 1)])
    bank = torch.cat([_copies(first[None], 40, 0.01), _copies(blend[None], 24, 0.01, seed=1),
                      _copies(second[None], 24, 0.06, seed=2), _copies(second[None], 40, 0.3, seed=4)])
    pipe = SamplingPipe(modes, bank)  # the denoiser holds the blend as a mode: it is as stable as a copy
    extracted = extract_training_images(pipe, num_samples=128, repeats=4)
    nearest = torch.cdist(extracted.images.flatten(1), modes.flatten(1)).argmin(1)
    assert sorted(nearest.tolist()) == [0, 1]
    kept = extract_training_images(pipe, num_samples=128, repeats=4, blend_ratio=math.inf)
    assert 2 in torch.cdist(kept.images.flatten(1), modes.flatten(1)).argmin(1).tolist()
    # without families (one bank-wide stable quarter) the second image is missed and the blend taken for it
    from diffusers_memsep.memorization import model_score

    monkeypatch.setattr(model_score, "MIN_FAMILY_SIZE", 10 ** 6)
    plain = extract_training_images(pipe, num_samples=128, repeats=4)
    assert sorted(torch.cdist(plain.images.flatten(1), modes.flatten(1)).argmin(1).tolist()) == [0, 2]


def test_extraction_rescues_a_training_image_with_one_stable_copy(monkeypatch):
    """Image 3's copies are all unstable but one, so the clustering leaves that one alone and drops it; the rescue
    adds it back (the paper's rule calls its other copies in the bank its copies), and not a stable novel sample
    alone in the bank, nor a spread copy of an extracted image."""
    from diffusers_memsep.memorization import model_score

    monkeypatch.setattr(model_score, "MIN_FAMILY_SIZE", 10 ** 6)  # one bank-wide stable quarter
    images = load_digits_dataset()[0]
    train = images[:4]
    copies = _copies(train[:3], 20, 0.01)  # 20 tight copies of images 0-2, in the order 0, 1, 2, 0, 1, 2, ...
    spread = train[0] + 0.3 * torch.randn(train[0].shape, generator=torch.Generator().manual_seed(2))
    bank = torch.cat([copies, _copies(train[3:], 6, 0.05, seed=1), images[200:201], images[100:139], spread[None]])
    scores = torch.cat([torch.full((24,), -0.001), torch.full((36,), -0.01),  # 8 copies of each image most stable
                        torch.tensor([-0.002]), torch.full((5,), -0.5),  # one stable copy of image 3, 5 unstable
                        torch.tensor([-0.0015]), torch.full((39,), -1.0), torch.tensor([-0.0012])])
    found = {}
    for rescue in (False, True):
        stable, picked, _ = model_score._extract_from_bank(bank, scores, None, 1, 0.25, 2.0, 2.0, rescue)
        found[rescue] = sorted(torch.cdist(bank[stable[picked]].flatten(1), train.flatten(1)).argmin(1).tolist())
        assert {60, 66, 106} <= set(stable.tolist())  # image 3's copy, the novel sample and the spread copy
        representatives = set(stable[picked].tolist())
        assert 66 not in representatives and 106 not in representatives
    assert found == {False: [0, 1, 2], True: [0, 1, 2, 3]}


def test_extraction_recovers_the_training_images_and_applies_the_paper_rule_to_them():
    from diffusers_memsep.memorization import memorization_report
    from diffusers_memsep.memorization.model_score import THRESHOLDS, extract_training_images

    images = load_digits_dataset()[0]
    train, held_out = images[:4], images[100:164]
    pipe = SamplingPipe(train, torch.cat([_copies(train, 16, 0.02), held_out]))  # half copies, half novel digits
    extracted = extract_training_images(pipe, num_samples=96, repeats=4)
    assert len(extracted.images) == 4 and extracted.num_stable == 24
    nearest = torch.cdist(extracted.images.flatten(1), train.flatten(1))
    assert sorted(nearest.argmin(1).tolist()) == [0, 1, 2, 3] and nearest.min(1).values.max() < 0.5

    samples = torch.cat([_copies(train, 4, 0.02, seed=1), _copies(train, 4, 0.5, seed=2), images[300:324]])
    result = memorization_score(pipe, samples, method="extraction", value_range="-11", extracted=extracted)
    assert result.method == "extraction" and result.num_extracted == 4 and result.threshold == THRESHOLDS[
        "extraction"]
    # the score is the paper's 1/3 rule with the extracted images as the reference (log(d2 / d1), 0 at the ratio
    # 1) plus half the re-noising margin log(0.025 / r), r the mean return distance of "renoise" with 16 draws
    against_extracted = memorization_report(samples, extracted.images)
    returns = memorization_score(pipe, samples, value_range="-11", repeats=16).score
    expected = -against_extracted.distance_ratio.double().log() + 0.5 * (
        math.log(0.025) - (-returns.double()).log())
    torch.testing.assert_close(result.score.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(result.memorized, result.score >= math.log(9))
    truth = memorization_report(samples, train).memorized  # against the real training images
    assert truth.any() and (~truth).any()
    assert roc_auc_score(truth.numpy(), result.score.numpy()) >= 0.95
    # without a precomputed extraction, the same (seeded) extraction is made inside
    again = memorization_score(pipe, samples, method="extraction", value_range="-11", num_samples=96, repeats=4)
    reused = memorization_score(pipe, samples, method="extraction", value_range="-11", extracted=extracted,
                                repeats=4)
    torch.testing.assert_close(again.score, reused.score)
    # the bank of an extraction clustered again gives the same images with the same options, and samples nothing:
    # a pipeline that can only sample novel digits (nothing to extract) is given the earlier bank
    novel_only = SamplingPipe(train, held_out)
    assert len(extract_training_images(novel_only, num_samples=96, repeats=4).images) == 0
    reclustered = extract_training_images(novel_only, from_extraction=extracted)
    torch.testing.assert_close(reclustered.images, extracted.images)
    assert torch.equal(reclustered.bank, extracted.bank) and extracted.bank.shape == (96, *train.shape[1:])


def test_extraction_falls_back_to_renoise_when_the_model_copies_nothing_extractable():
    from diffusers_memsep.memorization.model_score import THRESHOLDS, extract_training_images

    images = load_digits_dataset()[0]
    pipe = SamplingPipe(images[:4], images[200:264])  # its samples are novel digits only
    extracted = extract_training_images(pipe, num_samples=64, repeats=2)
    assert len(extracted.images) == 0 and extracted.bank_scores.shape == (64,)
    result = memorization_score(pipe, images[:8], method="extraction", value_range="-11", extracted=extracted,
                                threshold=5.0)
    assert result.method == "renoise" and result.num_extracted == 0 and result.threshold == THRESHOLDS["renoise"]
    assert result.score[:4].min() > result.score[4:].max()  # the training images are still the most stable


@pytest.mark.parametrize("kwargs, message", [
    ({"extracted": "images"}, "extracted must be what extract_training_images returned"),
    ({"stable_fraction": 0.0}, "stable_fraction"),
    ({"num_samples": 1}, "num_samples"),
    ({"blend_ratio": 1.0}, "blend_ratio"),
    ({"from_extraction": "bank"}, "from_extraction must be what extract_training_images returned"),
])
def test_bad_arguments_of_extraction(kwargs, message):
    images = load_digits_dataset()[0][:4]
    pipe = SamplingPipe(images, images)
    with pytest.raises(ValueError, match=message):
        memorization_score(pipe, images, method="extraction", value_range="-11", **kwargs)


def test_measure_script_update_replaces_columns_only_for_the_same_labels():
    """``scripts/measure_model_score.py --update``: the rescored columns replace the earlier run's, the others stay,
    and a retrained model that samples other labels is refused (nothing merged)."""
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "measure_model_score.py"))
    earlier = {"arguments": {}, "results": [{"setting": "digits8", "checkpoints": [
        {"step": 1000, "memorized": [True, False], "methods": {"a": {"auc": 0.5}, "b": {"auc": 0.6}}}]}]}
    new = {"setting": "digits8", "checkpoints": [{"step": 1000, "memorized": [True, False],
                                                 "methods": {"b": {"auc": 0.9}}}]}
    merged = script["merged_into"](earlier, new)
    assert merged["checkpoints"][0]["methods"] == {"a": {"auc": 0.5}, "b": {"auc": 0.9}}
    assert earlier["results"][0]["checkpoints"][0]["methods"]["b"] == {"auc": 0.6}  # the earlier run untouched
    kept = script["merged_into"](earlier, new, keep_as="old")["checkpoints"][0]["methods"]
    assert kept == {"a": {"auc": 0.5}, "b": {"auc": 0.9}, "b (old)": {"auc": 0.6}}
    new["checkpoints"][0]["memorized"] = [False, False]
    with pytest.raises(SystemExit, match="does not sample the earlier run's labels"):
        script["merged_into"](earlier, new)
    with pytest.raises(SystemExit, match="no setting 'colour16'"):
        script["merged_into"](earlier, {**new, "setting": "colour16"})
