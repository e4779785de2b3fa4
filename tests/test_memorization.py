"""Tests of diffusers_memsep.memorization: exact k-NN index, the paper's 1/3 rule, precision/recall,
Frechet distance."""

import math

import pytest
import torch

from diffusers_memsep.memorization import (
    MemorizationResult,
    NearestNeighborIndex,
    frechet_distance,
    memorization_ratio,
    memorization_report,
    precision_recall,
)


def brute_force(queries, train, k):
    d2 = torch.cdist(queries.flatten(1).double(), train.flatten(1).double()).square()
    return d2.topk(k, dim=1, largest=False)


@pytest.fixture
def train_images():
    return torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("chunk_size", [7, 64, 4096])
def test_search_matches_brute_force(train_images, chunk_size):
    queries = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    index = NearestNeighborIndex.from_images(train_images)
    distances, indices = index.search(queries, k=5, chunk_size=chunk_size, query_chunk_size=16)
    expected_distances, expected_indices = brute_force(queries, train_images, 5)
    assert distances.dtype == torch.float32 and indices.dtype == torch.int64 and distances.shape == (40, 5)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances.double(), expected_distances, rtol=1e-5, atol=1e-5)


def test_search_is_exact_where_float32_expansion_is_not():
    # Points far from the origin with neighbours 1e-3 apart: ||a||^2 - 2ab + ||b||^2 cancels catastrophically in
    # float32 and ranks them wrongly; the re-ranking and the float64 fallback must still return the true order.
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randn(2000, 16, generator=generator) * 1e-2
    train = 300.0 + offsets
    queries = 300.0 + offsets[:20] + torch.randn(20, 16, generator=generator) * 1e-3
    distances, indices = NearestNeighborIndex(train).search(queries, k=3, spare_candidates=1, chunk_size=256)
    naive = torch.addmm((train.square().sum(1)), queries, train.T, alpha=-2).topk(3, largest=False).indices
    expected_distances, expected_indices = brute_force(queries, train, 3)
    assert not torch.equal(naive, expected_indices)  # the naive float32 expansion really is wrong here
    assert torch.equal(indices, expected_indices)


def test_vectors_and_images_give_the_same_answer(train_images):
    queries = train_images[:5] + 0.01
    images_result = NearestNeighborIndex(train_images).search(queries)
    vectors_result = NearestNeighborIndex(train_images.flatten(1)).search(queries.flatten(1))
    assert torch.equal(images_result[1], vectors_result[1])


def test_copy_is_flagged_and_far_sample_is_not(train_images):
    index = NearestNeighborIndex.from_images(train_images)
    copy = train_images[[17]]
    far = torch.full((1, 1, 8, 8), 5.0)  # far from every training image: nearest and second nearest alike
    result = memorization_report(torch.cat([copy, far]), index)
    assert isinstance(result, MemorizationResult)
    assert result.memorized.tolist() == [True, False]
    assert result.nearest_index[0].item() == 17
    assert result.distance_ratio[0].item() == 0.0 and result.distance_ratio[1].item() > 1 / 9


def test_ratio_and_flags_match_brute_force(train_images):
    generator = torch.Generator().manual_seed(2)
    # a mix of near copies at several noise levels, so both sides of the 1/9 cut occur
    noise = torch.randn(60, 1, 8, 8, generator=generator) * torch.logspace(-3, 0, 60).reshape(-1, 1, 1, 1)
    samples = train_images[:60] + noise
    result = memorization_report(samples, train_images)  # a raw tensor works too
    d2, idx = brute_force(samples, train_images, 2)
    expected_ratio = (d2[:, 0] / d2[:, 1]).float()
    torch.testing.assert_close(result.distance_ratio, expected_ratio, rtol=1e-4, atol=1e-6)
    assert torch.equal(result.nearest_index, idx[:, 0])
    assert torch.equal(result.memorized, d2[:, 0] <= d2[:, 1] / 9)
    assert 0 < result.memorized.sum() < 60
    assert memorization_ratio(samples, train_images) == pytest.approx(result.memorized.float().mean().item())


def test_vectors_for_gaussian_mixture_experiments():
    train = torch.randn(100, 32, generator=torch.Generator().manual_seed(3))
    samples = torch.cat([train[:30], torch.randn(70, 32, generator=torch.Generator().manual_seed(4))])
    assert memorization_ratio(samples, train) == pytest.approx(0.3)


def test_duplicated_training_image_copy_counts_as_memorized(train_images):
    train = torch.cat([train_images, train_images[:1]])
    result = memorization_report(train_images[:1], train)
    assert result.memorized.item() and result.distance_ratio.item() == 0.0


def test_save_load_round_trip(tmp_path, train_images):
    index = NearestNeighborIndex.from_images(train_images)
    index.save(tmp_path / "index.safetensors")
    loaded = NearestNeighborIndex.load(tmp_path / "index.safetensors")
    assert torch.equal(loaded.images, train_images) and loaded.sample_shape == (1, 8, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["index.safetensors"]  # no temporary file left
    index.save_pretrained(tmp_path / "pretrained")
    again = NearestNeighborIndex.from_pretrained(tmp_path / "pretrained")
    queries = train_images[:3] + 0.1
    assert torch.equal(again.search(queries)[1], index.search(queries)[1])
    assert again.num_images == 300 and again.config.sample_shape == [1, 8, 8]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: NearestNeighborIndex(torch.zeros(0, 1, 8, 8)), "empty"),
        (lambda: NearestNeighborIndex(torch.zeros(1, 4)), "at least 2"),
        (lambda: NearestNeighborIndex(torch.tensor([[0.0, float("nan")], [0.0, 0.0]])), "NaN"),
        (lambda: NearestNeighborIndex([[0.0, 1.0], [1.0, 0.0]]), "torch.Tensor"),
        (lambda: NearestNeighborIndex(), "needs `images`"),
    ],
)
def test_bad_reference(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_bad_queries_and_k(train_images):
    index = NearestNeighborIndex(train_images)
    with pytest.raises(ValueError, match="k >= 2"):
        index.search(train_images[:2], k=1)
    with pytest.raises(ValueError, match="k <= 300"):
        index.search(train_images[:2], k=301)
    with pytest.raises(ValueError, match="same space and resolution"):
        index.search(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="threshold"):
        memorization_report(train_images[:2], index, threshold=2.0)
    with pytest.raises(FileNotFoundError, match="NearestNeighborIndex.save"):
        NearestNeighborIndex.load("/nonexistent/index.safetensors")


def test_faiss_backend_matches_torch(train_images):
    pytest.importorskip("faiss")
    queries = train_images[:10] + 0.05
    index = NearestNeighborIndex(train_images)
    assert torch.equal(index.search(queries, backend="faiss")[1], index.search(queries)[1])


# --------------------------------------------------------------------------------------------- precision / recall
def test_precision_recall_against_brute_force():
    generator = torch.Generator().manual_seed(5)
    real, fake = torch.randn(200, 4, generator=generator), torch.randn(150, 4, generator=generator) * 1.5 + 0.5
    precision, recall = precision_recall(real, fake, k=3)

    def manifold_fraction(points, support, k):
        radii = torch.cdist(support, support).sort(1).values[:, k]  # column 0 is the point itself
        return (torch.cdist(points, support) <= radii[None]).any(1).float().mean().item()

    assert precision == pytest.approx(manifold_fraction(fake, real, 3), abs=1e-6)
    assert recall == pytest.approx(manifold_fraction(real, fake, 3), abs=1e-6)


def test_precision_recall_extremes():
    real = torch.randn(100, 8, generator=torch.Generator().manual_seed(6))
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # copies of a few training points: perfect precision, poor recall (the paper: memorization inflates precision)
    precision, recall = precision_recall(real, real[:5].repeat(4, 1))
    assert precision == 1.0 and recall < 0.3
    with pytest.raises(ValueError, match="same feature extractor"):
        precision_recall(real, torch.randn(10, 3))
    with pytest.raises(ValueError, match="k=10"):
        precision_recall(real, torch.randn(10, 8), k=10)


# ------------------------------------------------------------------------------------------------ Frechet distance
def test_frechet_distance_closed_form():
    # N(0, I) vs N(m, 4 I) in d dims: ||m||^2 + d (1 + 4 - 2 * 2) = ||m||^2 + d
    generator = torch.Generator().manual_seed(7)
    d = 3
    real = torch.randn(20000, d, generator=generator)
    fake = 2 * torch.randn(20000, d, generator=generator) + 1.0
    assert frechet_distance(real, fake) == pytest.approx(d + d, rel=0.05)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    generator = torch.Generator().manual_seed(8)
    real = torch.randn(500, 6, generator=generator) @ torch.randn(6, 6, generator=generator)
    fake = torch.randn(400, 6, generator=generator) @ torch.randn(6, 6, generator=generator) + 0.3
    r, f = real.double().numpy(), fake.double().numpy()
    import numpy as np

    cov_r, cov_f = np.cov(r, rowvar=False), np.cov(f, rowvar=False)
    covmean = scipy_linalg.sqrtm(cov_r @ cov_f).real
    expected = ((r.mean(0) - f.mean(0)) ** 2).sum() + np.trace(cov_r + cov_f - 2 * covmean)
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_with_feature_callable():
    real, fake = torch.randn(50, 1, 4, 4), torch.randn(60, 1, 4, 4) + 1
    value = frechet_distance(real, fake, features=lambda x: x.flatten(1).mean(1, keepdim=True), batch_size=7)
    assert math.isfinite(value) and value > 0.5
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(real[:1], fake)


def test_half_precision_reference_still_searches_in_float32(train_images):
    index = NearestNeighborIndex(train_images).to(torch.float16)
    queries = train_images[:4].half().float() + 0.01
    _, expected = brute_force(queries, train_images.half().float(), 2)
    assert torch.equal(index.search(queries)[1], expected)


def test_tiny_chunks_and_float64_fallback_blocks(train_images):
    # chunks smaller than the candidate list, and a forced float64 re-search (no spare candidates)
    queries = train_images[:6] + 0.02
    index = NearestNeighborIndex(train_images)
    distances, indices = index.search(queries, k=4, chunk_size=3, spare_candidates=0)
    assert index.last_search_fallbacks == 6
    expected_distances, expected_indices = brute_force(queries, train_images, 4)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances.double(), expected_distances, rtol=1e-5, atol=1e-6)
