"""The search kernel of NearestNeighborIndex: grouped smallest-column selection and exact re-ranking at scale."""

import pytest
import torch

from diffusers_memsep.memorization import NearestNeighborIndex
from diffusers_memsep.memorization.index import _smallest_columns


@pytest.mark.parametrize("columns,num", [(4096, 10), (2048, 3), (1000, 10), (160, 2)])
def test_smallest_columns_returns_the_smallest_values_and_their_columns(columns, num):
    generator = torch.Generator().manual_seed(columns)
    # small integers: many ties, inside and across groups
    scores = torch.randint(-50, 50, (37, columns), generator=generator).float()
    scores[0, :] = 7.0  # a row of one value
    scores[1, ::97] = -100.0  # the smallest values spread over many groups
    values, columns_found = _smallest_columns(scores, num)
    assert values.shape == columns_found.shape == (37, num)
    assert torch.equal(scores.gather(1, columns_found), values)  # the columns hold the values returned
    assert (columns_found.sort(1).values.diff(dim=1) > 0).all()  # no column twice
    expected = scores.topk(num, dim=1, largest=False).values
    assert torch.equal(values.sort(1).values, expected.sort(1).values)


def test_grouped_kernel_is_exact_where_float32_expansion_is_not():
    # Large chunks (the grouped selection path) on points far from the origin, neighbours 1e-3 apart: the float32
    # expansion ranks them wrongly, the filtered re-ranking and the float64 fallback must restore the true order.
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randn(6000, 16, generator=generator) * 1e-2
    train = 300.0 + offsets
    queries = 300.0 + offsets[:20] + torch.randn(20, 16, generator=generator) * 1e-3
    index = NearestNeighborIndex(train)
    distances, indices = index.search(queries, k=3, spare_candidates=1, chunk_size=4096)
    expected = torch.cdist(queries.double(), train.double()).square().topk(3, dim=1, largest=False)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(distances.double(), expected.values, rtol=1e-4, atol=1e-4)


def test_grouped_kernel_matches_brute_force_with_duplicates():
    generator = torch.Generator().manual_seed(3)
    train = torch.randn(5000, 24, generator=generator)
    train[4000:4100] = train[:100]  # exact duplicates: equal distances, either row is a correct answer
    queries = torch.cat([train[:30] + 1e-2 * torch.randn(30, 24, generator=generator),
                         torch.randn(30, 24, generator=generator)])
    distances, indices = NearestNeighborIndex(train).search(queries, k=2, chunk_size=4096)
    brute = torch.cdist(queries.double(), train.double()).square()
    torch.testing.assert_close(distances.double(), brute.topk(2, dim=1, largest=False).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(brute.gather(1, indices), distances.double(), rtol=1e-5, atol=1e-5)
    assert (indices[:, 0] != indices[:, 1]).all()
