"""The registered pixel rule: shifted, mirrored and zoomed copies of training images are caught at a threshold
calibrated on held-out images, novel images are not; the batched distance equals a loop over the same alignments;
the combined rule (copy space OR registered rule) keeps its union at the calibrated false-positive rate."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from diffusers_memsep.data import load_training_data
from diffusers_memsep.memorization.copy_detection import (
    CopyDetectionNet,
    CopySpace,
    RegisteredPixelRule,
    _blur,
    _shift,
    _smoothing_gain,
    _zoom,
    calibrate_combined,
    calibrate_registered_threshold,
    combined_report,
    conformal_count,
    estimate_noise_sigma,
    max_similarity,
    registered_report,
    threshold_below,
    zoom_positions,
)


@pytest.fixture(scope="module")
def digits():
    images = load_training_data().images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return images[order[:16]], images[order[16:416:2]], images[order[17:417:2]]  # train, calibration, evaluation


def brute_force(rule, samples, reference):
    """Every (sample, training image, alignment) triple, one at a time, with the same alignment primitives."""
    radius = rule.max_shift
    best, every = [], []
    for x in samples:
        scores = []
        for j, t in enumerate(reference):
            k = 0
            for zoom in rule.zooms:
                for top, left in zoom_positions(t.shape, zoom):
                    zoomed = _zoom(t[None], zoom, top, left, rule.padding)
                    for mirrored in ((False, True) if rule.flip else (False,)):
                        view = zoomed.flip(-1) if mirrored else zoomed
                        for sigma in rule.blurs:
                            blurred = _blur(view, torch.tensor([sigma])) if sigma else view
                            for dy, dx in itertools.product(range(-radius, radius + 1), repeat=2):
                                aligned = _shift(blurred, dy, dx, radius, rule.padding)
                                a, b = rule._flat(x[None])[0], rule._flat(aligned)[0]
                                scores.append((float(((a - b) ** 2).mean()), j, k))
                                k += 1
        best.append(min(scores))
        every.append({(j, k): score for score, j, k in scores})
    return best, every


@pytest.mark.parametrize("padding", ["replicate", "zeros"])
def test_registered_distance_equals_brute_force(padding):
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(3, 2, 6, 7, generator=generator) * 2 - 1
    samples = torch.cat([_shift(reference[:1], 1, -1, 1, padding).flip(-1),
                         torch.rand(3, 2, 6, 7, generator=generator) * 2 - 1])
    rule = RegisteredPixelRule(max_shift=1, zooms=(0.8, 1.0, 1.25), blurs=(0.0, 1.0), padding=padding,
                               smooth=0.5, reference_batch=1, sample_batch=2)  # chunks of 1 image, 2 samples
    distance, index, alignment = rule.distance(samples, reference)
    expected, every = brute_force(rule, samples, reference)
    assert len(rule.alignment_names(reference.shape)) == rule.num_alignments(reference.shape) == \
        rule.alignments(reference).shape[1]
    assert torch.allclose(distance, torch.tensor([e[0] for e in expected]), atol=1e-5)
    assert index.tolist() == [e[1] for e in expected]
    for row, (j, k) in enumerate(zip(index.tolist(), alignment.tolist())):  # the alignment found (or a tie of it)
        assert every[row][(j, k)] == pytest.approx(expected[row][0], abs=1e-5)
    assert distance[0] < 1e-6 and "flipped" in rule.alignment_names(reference.shape)[alignment[0]]


def test_zoom_is_a_crop_and_resize():
    images = torch.rand(2, 3, 10, 10) * 2 - 1
    for top, left in zoom_positions(images.shape, 1.1):  # side 9 at offsets 0 or 1
        crop = F.interpolate(images[:, :, top:top + 9, left:left + 9], size=(10, 10), mode="bilinear",
                             align_corners=False)
        # equal inside the crop (at its edges the rule interpolates with the image pixels beyond it)
        assert torch.allclose(_zoom(images, 1.1, top, left, "replicate")[..., 1:9, 1:9], crop[..., 1:9, 1:9],
                              atol=1e-5)
    small = F.interpolate(images, size=(9, 9), mode="bilinear", align_corners=False)
    shrunk = _zoom(images, 0.9, 1, 0, "zeros")
    assert torch.allclose(shrunk[:, :, 1:, :9], small, atol=1e-5) and (shrunk[:, :, 0] == -1).all()


@pytest.mark.parametrize("padding", ["replicate", "zeros"])
def test_shifted_flipped_zoomed_copies_caught_novel_images_not(digits, padding):
    """Copies whose uncovered pixels follow the rule's padding (border pixels repeated, or black)."""
    train, calibration, evaluation = digits
    rule = RegisteredPixelRule(padding=padding)
    rule.threshold = calibrate_registered_threshold(rule, train, calibration)
    assert registered_report(rule, calibration, train).copied.float().mean() <= 0.01
    # novel digits: calibrated on 200 images at 1%, the rate on 200 others is a few percent at most
    assert registered_report(rule, evaluation, train).copied.float().mean() <= 0.05
    pad = (lambda x, p: F.pad(x, p, mode="replicate")) if padding == "replicate" else (
        lambda x, p: F.pad(x, p, value=-1.0))
    padded = pad(train, (2, 2, 2, 2))
    shrunk = pad(F.interpolate(train, size=(7, 7), mode="bilinear", align_corners=False), (0, 1, 1, 0))
    copies = {"shift 1 px": padded[:, :, 1:9, 2:10], "shift 2 px": padded[:, :, 4:12, 0:8],
              "flip": train.flip(-1), "shift 1 px + flip": padded[:, :, 3:11, 2:10].flip(-1), "zoom 0.9": shrunk}
    for name, images in copies.items():
        report = registered_report(rule, images, train)
        assert report.copied.all(), (name, report.distance, rule.threshold)
        assert (report.nearest_index == torch.arange(16)).all(), name
    # without registration the pixel distance misses the shifted copies
    raw = RegisteredPixelRule(max_shift=0, flip=False, zooms=(1.0,), normalize=False)
    raw.threshold = calibrate_registered_threshold(raw, train, calibration)
    assert registered_report(raw, copies["shift 2 px"], train).copied.float().mean() < 0.5


@pytest.mark.parametrize("split", ["standardized", "joint", "equal"])
def test_combined_rule_calibrated_false_positives(digits, split):
    train, calibration, evaluation = digits
    torch.manual_seed(0)
    space = CopySpace("untrained", CopyDetectionNet(in_channels=1, resolution=8, width=4).eval())
    rule = RegisteredPixelRule()
    similarity = max_similarity(space, calibration, train)[0]
    distance = rule.distance(calibration, train)[0]
    thresholds = calibrate_combined(similarity, distance, 0.01, split)
    report = combined_report(space, rule, calibration, train, thresholds)
    assert report.copied.float().mean() <= 0.01
    assert torch.equal(report.copied, (similarity >= thresholds[0]) | (distance <= thresholds[1]))
    # each rule alone is no looser than its own 1% threshold
    assert thresholds[1] <= threshold_below(distance) and report.copy_space.threshold == thresholds[0]
    flipped = combined_report(space, rule, train.flip(-1), train, thresholds)
    assert flipped.copied.all() and (flipped.nearest_index == torch.arange(16)).all()
    if split == "joint":  # never stricter than 0.5% each
        equal = calibrate_combined(similarity, distance, 0.01, "equal")
        assert thresholds[0] <= equal[0] and thresholds[1] >= equal[1]


def test_standardized_combination_keeps_its_promise():
    """Monte Carlo on exchangeable held-out scores (cosine ~ normal, distance ~ log-normal, independent): the
    standardised combination flags a new image with probability close to (k + 1) / (n + 1) <= 1%, and never more
    than k of the held-out images themselves."""
    generator = torch.Generator().manual_seed(12)
    n, trials, flagged = 364, 4000, 0
    for _ in range(trials):
        similarity = 0.5 + 0.1 * torch.randn(n + 1, generator=generator)
        distance = torch.exp(-2 + 0.5 * torch.randn(n + 1, generator=generator))
        cosine, cut = calibrate_combined(similarity[:n], distance[:n], 0.01, "standardized")
        union = (similarity >= cosine) | (distance <= cut)
        assert int(union[:n].sum()) <= conformal_count(n)  # the held-out images themselves: within budget
        flagged += bool(union[n])
    promise = (conformal_count(n) + 1) / (n + 1)
    assert promise <= 0.01 and abs(flagged / trials - promise) < 4 * (promise / trials) ** 0.5, flagged / trials


def test_bad_inputs():
    with pytest.raises(ValueError, match="padding must be one of"):
        RegisteredPixelRule(padding="reflect")
    with pytest.raises(ValueError, match="max_shift"):
        RegisteredPixelRule(max_shift=-1)
    rule = RegisteredPixelRule()
    with pytest.raises(ValueError, match="same shape"):
        rule.distance(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 6, 6))
    with pytest.raises(ValueError, match="no threshold"):
        registered_report(rule, torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="split must be"):
        calibrate_combined(torch.zeros(4), torch.zeros(4), 0.01, "max")


def smooth_fields(count: int, seed: int, amplitude: float = 0.15) -> torch.Tensor:
    """Nearly flat 3x32x32 images (a grey sky, a wall): a grey level, a faint tint and a faint 4x4 field upsampled
    bicubically (the rule normalises over all channels, so a strong colour would not be flat)."""
    generator = torch.Generator().manual_seed(seed)
    colour = torch.rand(count, 1, 1, 1, generator=generator) * 1.2 - 0.6 + 0.03 * torch.randn(count, 3, 1, 1,
                                                                                                generator=generator)
    field = F.interpolate(torch.randn(count, 3, 4, 4, generator=generator), size=(32, 32), mode="bicubic",
                          align_corners=False)
    return (colour + amplitude * field).clamp(-1, 1)


def test_noise_estimate_recovers_white_noise_and_ignores_smooth_content():
    generator = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(8, 3, 32, 32, generator=generator)
    assert torch.allclose(estimate_noise_sigma(noise), torch.full((8,), 0.1), rtol=0.1)
    fields = smooth_fields(8, 1)
    assert estimate_noise_sigma(fields).max() < 0.01
    assert torch.allclose(estimate_noise_sigma(fields + noise), torch.full((8,), 0.1), rtol=0.15)
    assert estimate_noise_sigma(torch.zeros(2, 1, 9, 9)).tolist() == [0.0, 0.0]  # odd sizes: last row/column dropped


def test_smoothing_gain_is_the_variance_of_blurred_white_noise():
    noise = torch.randn(512, 1, 32, 32, generator=torch.Generator().manual_seed(10))
    blurred = _blur(noise, torch.full((512,), 1.5))
    assert abs(blurred.var().item() / (_smoothing_gain(1.5, 32) ** 2) - 1) < 0.03
    # away from the border: the 5-tap kernel's own sum of squared weights (0.0503 in 2-D at sigma 1.5)
    weights = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / (2 * 1.5 ** 2))
    assert abs(_smoothing_gain(1.5, 4000) - float((weights / weights.sum()).square().sum())) < 1e-3


@pytest.mark.parametrize("per_channel", [False, True])
def test_noise_correction_subtracts_the_noise_a_noisy_copy_adds(per_channel):
    train = smooth_fields(16, 2, amplitude=0.05)  # standard deviation below the floor 0.2 (in every channel too)
    noisy = (train + 0.1 * torch.randn(train.shape, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    plain = RegisteredPixelRule(noise_correction=False, per_channel=per_channel)
    corrected = RegisteredPixelRule(per_channel=per_channel)
    expected = corrected.noise_distance(noisy, train).diagonal()
    # closed form for a flat image: sigma^2 * sum(w^2) / floor^2
    gain = _smoothing_gain(1.5, 32) ** 2
    assert torch.allclose(expected, torch.full((16,), 0.01 * gain / 0.2 ** 2), rtol=0.3)  # sigma's estimate: ~10%
    raw_distance = plain.distance(noisy, train)[0]
    assert torch.allclose(raw_distance, expected, rtol=0.3)  # the noise is what separates the copy from its source
    corrected_distance, index, _ = corrected.distance(noisy, train)
    assert (corrected_distance < 0.25 * raw_distance).all() and (index == torch.arange(16)).all()
    # what is subtracted is the noise beyond the training image's: a clean copy and a noisy reference get none
    assert corrected.noise_distance(train, noisy).abs().max() == 0


@pytest.mark.parametrize("per_channel", [False, True])
def test_noise_corrected_distance_equals_brute_force(per_channel):
    rule = RegisteredPixelRule(max_shift=1, zooms=(1.0,), blurs=(0.0,), reference_batch=3 * 16 * 16 * 9 * 2,
                               per_channel=per_channel)
    generator = torch.Generator().manual_seed(4)
    train = F.interpolate(torch.rand(5, 3, 4, 4, generator=generator) * 2 - 1, size=(16, 16), mode="bilinear")
    samples = (train[[0, 2, 4]] + 0.15 * torch.randn(3, 3, 16, 16, generator=generator)).clamp(-1, 1)
    samples = torch.cat([samples, torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1])
    _, every = brute_force(rule, samples, train)
    noise = rule.noise_distance(samples, train)
    expected = torch.tensor([min(max(0.0, min(s for (j2, _), s in per.items() if j2 == j) - float(noise[b, j]))
                                 for j in range(len(train))) for b, per in enumerate(every)])
    distance, index, _ = rule.distance(samples, train)
    assert noise[:3].diagonal().min() > 0 and torch.allclose(distance, expected, atol=1e-6)
    assert index[:3].tolist() == [0, 2, 4]


def test_noise_correction_skips_small_images(digits):
    train, calibration, _ = digits
    noisy = (calibration[:32] + 0.1 * torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(5)))
    assert not RegisteredPixelRule().corrects_noise(train.shape)
    assert not RegisteredPixelRule().corrects_noise((1, 1, 1, 512)) and RegisteredPixelRule().corrects_noise((16, 16))
    assert torch.equal(RegisteredPixelRule().distance(noisy, train)[0],
                       RegisteredPixelRule(noise_correction=False).distance(noisy, train)[0])


def test_noisy_copies_of_flat_images_caught_at_calibrated_false_positives():
    # faint fields: novel images are about as far apart as the noise moves a copy (as flat photograph patches are)
    train, calibration, evaluation = (smooth_fields(count, seed, amplitude=0.03) for count, seed in
                                      ((16, 6), (400, 7), (400, 8)))
    copies = (train.repeat(4, 1, 1, 1) + 0.1 * torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(9)))
    shares = {}
    for correction in (False, True):
        rule = RegisteredPixelRule(noise_correction=correction)
        rule.threshold = calibrate_registered_threshold(rule, train, calibration)
        assert registered_report(rule, evaluation, train).copied.float().mean() <= 0.025  # 1% on the calibration
        shares[correction] = registered_report(rule, copies.clamp(-1, 1), train).copied.float().mean().item()
    assert shares[True] >= 0.95 and shares[False] < 0.75, shares



def test_per_channel_normalisation_cancels_colour_gains():
    """Per-channel standardisation (each channel minus its mean over its floored std): a copy whose channels were
    rescaled and offset separately (a recolour) is at distance 0, while per-image normalisation still sees it; the
    noise term uses the mean over channels of 1 / std_c^2."""
    train = 0.7 * smooth_fields(6, 11, amplitude=1.5)  # every channel's std above the floor (0.2) after the gains
    gains, offsets = torch.tensor([0.8, 1.0, 1.2]).view(1, 3, 1, 1), torch.tensor([0.1, 0.0, -0.1]).view(1, 3, 1, 1)
    recoloured = train * gains + offsets
    assert recoloured.abs().max() <= 1  # no clipping: the invariance is exact
    per_image, per_channel = RegisteredPixelRule(noise_correction=False), RegisteredPixelRule(per_channel=True,
                                                                                              noise_correction=False)
    smoothed = per_channel._flat_smoothed(train).flatten(2)
    manual = (smoothed - smoothed.mean(2, keepdim=True)) / smoothed.std(2, unbiased=False, keepdim=True).clamp_min(0.2)
    assert torch.allclose(per_channel._flat(train), manual.flatten(1), atol=1e-6)
    distance, index, _ = per_channel.distance(recoloured, train)
    assert distance.max() < 1e-5 and (index == torch.arange(6)).all()
    assert per_image.distance(recoloured, train)[0].min() > 1e-3
    _, _, factor = RegisteredPixelRule(per_channel=True)._noise_terms(train, train)
    inverse = manual.new_tensor([[1 / max(float(smoothed[b, c].std(unbiased=False)), 0.2) ** 2 for c in range(3)]
                                 for b in range(6)]).mean(1)
    assert torch.allclose(factor, inverse * _smoothing_gain(1.5, 32) ** 2, rtol=1e-5)
