"""On-disk reference shards give exactly the answer of one in-memory index (indices, ties, distances)."""

import pytest
import torch

from diffusers_memsep.memorization import NearestNeighborIndex
from diffusers_memsep.memorization.shards import ShardedReference, save_reference_shards


def test_sharded_reference_equals_one_index(tmp_path):
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(103, 3, 4, 4, generator=generator)
    train[61] = train[7]  # an exact tie across shards: the smaller global index first
    queries = torch.cat([train[[7, 100, 40]] + 1e-3 * torch.randn(3, 3, 4, 4, generator=generator),
                         torch.randn(5, 3, 4, 4, generator=generator)])
    save_reference_shards(train.split(20), tmp_path)  # shards of 20 and a last one of 3
    reference = ShardedReference(tmp_path)
    assert reference.num_images == 103 and reference.sample_shape == (3, 4, 4) and len(reference.shards) == 6
    distances, indices = reference.search(queries, k=2)
    expected_distances, expected_indices = NearestNeighborIndex(train).search(queries, k=2)
    assert indices[0].tolist() == [7, 61]
    assert torch.equal(indices[1:], expected_indices[1:])
    torch.testing.assert_close(distances, expected_distances)


def test_one_row_shard_and_bad_chunks(tmp_path):
    train = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    save_reference_shards([train[:4], train[4:]], tmp_path / "a")  # last shard holds one row
    distances, indices = ShardedReference(tmp_path / "a").search(train[[4, 0]], k=2)
    assert indices[:, 0].tolist() == [4, 0] and torch.allclose(distances[:, 0], torch.zeros(2), atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        save_reference_shards([train[:2], torch.zeros(2, 3)], tmp_path / "b")
    with pytest.raises(ValueError, match="NaN"):
        save_reference_shards([torch.full((2, 6), float("nan"))], tmp_path / "c")
    with pytest.raises(ValueError, match="shards.json"):
        ShardedReference(tmp_path / "nothing")
