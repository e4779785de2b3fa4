"""Several processes give the one-process answers: every head score, sharded nearest neighbours, split sampling work.

One real 2-process run (``torchrun``, gloo on CPU, the group initialised by accelerate's ``PartialState``) runs
this file as a script; rank 0 saves what every piece computed and the tests compare it with one process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_memsep import PrunableDiTTransformer2DModel
from diffusers_memsep.data import TrainingData, with_held_out
from diffusers_memsep.distributed import (
    all_gather_cat,
    gather_on_main,
    leave_process_group,
    main_process_result,
    rank_and_world_size,
    shard_bounds,
    split_work,
)
from diffusers_memsep.memorization import NearestNeighborIndex, sharded_search
from diffusers_memsep.pruning import METHODS, SMALL_TIME, head_importance
from diffusers_memsep.pruning.importance import _batches
from diffusers_memsep.trainer import make_noise_scheduler

from conftest import random_training_data, twelve_head_dit

ROOT = Path(__file__).resolve().parents[1]
NUM_SCORING_BATCHES = 5  # odd: the two processes score 2 and 3 batches
NUM_TRAIN, DIM, NUM_SEEDS = 101, 16, 11


def scored_dit() -> PrunableDiTTransformer2DModel:
    return PrunableDiTTransformer2DModel.from_dit(twelve_head_dit())


def reference_points():
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(NUM_TRAIN, DIM, generator=generator)
    train[57] = train[3]  # an exact tie across the two shards: the smaller global index must come first
    queries = torch.cat([train[[3, 80, 10]] + 1e-3 * torch.randn(3, DIM, generator=generator),
                         torch.randn(4, DIM, generator=generator)])
    return train, queries


def sample_for_seed(seed: int) -> torch.Tensor:
    """Stands in for one sampling batch of an evaluation: a result determined by its seed alone."""
    return torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))


def scores(method: str) -> torch.Tensor:
    held_out = TrainingData(torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1,
                            torch.arange(16) % 10, 10, "random held out")
    data = with_held_out(random_training_data(), held_out)  # memorization_gap reads the held-out images
    return head_importance(method, scored_dit(), data, make_noise_scheduler(), num_batches=NUM_SCORING_BATCHES,
                           batch_size=4).scores


def evaluation_samples() -> torch.Tensor:
    """evaluate.sample_pipeline of a tiny pipeline: 5 samples in batches of 2 (3 batches, split 2 + 1)."""
    from diffusers import DDPMScheduler

    from diffusers_memsep import MemSepPipeline
    from diffusers_memsep.evaluate import sample_pipeline

    pipe = MemSepPipeline(transformer=scored_dit(), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipe.set_progress_bar_config(disable=True)
    samples = sample_pipeline(pipe, 5, torch.tensor([0, 1, 2, 3, 4]), num_inference_steps=3, seed=7, batch_size=2)
    assert samples.denoising_steps.tolist() == [3] * 5  # gathered like the images
    return samples.images


def run_worker(output: str) -> None:
    """What every process runs under torchrun; rank 0 writes the results."""
    from accelerate import PartialState

    state = PartialState(cpu=True)
    assert state.num_processes == 2 and torch.distributed.is_initialized()
    results = {method: scores(method) for method in METHODS}
    stream = _batches(scored_dit(), [random_training_data()], make_noise_scheduler(), SMALL_TIME,
                      NUM_SCORING_BATCHES, 4, torch.Generator().manual_seed(0))
    results["batches_per_process"] = all_gather_cat(torch.tensor([len(list(stream))]))
    train, queries = reference_points()
    start, stop = shard_bounds(NUM_TRAIN)
    results["shard"] = torch.tensor([start, stop])
    results["neighbors"] = sharded_search(NearestNeighborIndex(train[start:stop]), start, queries, k=2)
    seeds = split_work(range(NUM_SEEDS))
    results["samples"] = gather_on_main(torch.cat([sample_for_seed(seed) for seed in seeds]))
    # one item for two processes: process 1 has no work and passes None
    only = split_work(range(1))
    results["all_gather_one_item"] = all_gather_cat(torch.cat([sample_for_seed(s) for s in only]) if only else None)
    results["evaluation_samples"] = evaluation_samples()
    results["main_process_result"] = main_process_result(lambda: {"rank": rank_and_world_size()[0]})
    try:  # an error on the main process reaches every process instead of leaving them waiting
        main_process_result(lambda: 1 // 0)
    except ZeroDivisionError:
        results["main_process_error"] = "raised on the main process"
    except RuntimeError as error:
        assert "ZeroDivisionError" in str(error) and not state.is_main_process, error
    if state.is_main_process:
        torch.save(results, output)
    else:
        assert results["samples"] is None
    leave_process_group()  # waits for every process, then ends the group (tested: the group is gone)
    assert not torch.distributed.is_initialized()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    output = tmp_path_factory.mktemp("distributed") / "results.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(output)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(output)


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_score_heads_like_one(two_process_results, method):
    one_process = scores(method)
    assert torch.isfinite(one_process).all() and one_process.abs().max() > 0
    # The per-batch terms are added in batch order whatever the number of processes: the same bits.
    assert torch.equal(two_process_results[method], one_process)
    assert two_process_results["batches_per_process"].tolist() == [2, 3]  # each process scored its share only


def test_two_processes_sharded_search_equals_one_index(two_process_results):
    train, queries = reference_points()
    assert two_process_results["shard"].tolist() == [0, 50]  # rank 0 (which saved) held rows 0..49, rank 1 the rest
    distances, indices = two_process_results["neighbors"]
    expected_distances, expected_indices = NearestNeighborIndex(train).search(queries, k=2)
    assert indices[0].tolist() == [3, 57]  # tie across shards: smaller global index first
    assert sorted(expected_indices[0].tolist()) == [3, 57] and torch.equal(indices[1:], expected_indices[1:])
    torch.testing.assert_close(distances, expected_distances)
    brute = torch.cdist(queries.double(), train.double()).square()
    torch.testing.assert_close(distances.double(), brute.gather(1, indices), rtol=1e-5, atol=1e-6)


def test_two_processes_split_and_gather_sampling_work(two_process_results):
    expected = torch.cat([sample_for_seed(seed) for seed in range(NUM_SEEDS)])
    assert torch.equal(two_process_results["samples"], expected)
    assert torch.equal(two_process_results["all_gather_one_item"], sample_for_seed(0))


def test_two_processes_sample_an_evaluation_like_one(two_process_results):
    expected = evaluation_samples()
    assert expected.shape == (5, 1, 8, 8)
    torch.testing.assert_close(two_process_results["evaluation_samples"], expected, rtol=1e-5, atol=1e-6)


def test_two_processes_share_the_main_process_result(two_process_results):
    # rank 1 received rank 0's result and its error (asserted in the worker)
    assert two_process_results["main_process_result"] == {"rank": 0}
    assert two_process_results["main_process_error"] == "raised on the main process"


def test_one_process_helpers_are_the_identity():
    assert shard_bounds(10) == (0, 10) and list(split_work(range(5))) == [0, 1, 2, 3, 4]
    assert [shard_bounds(10, rank, 3) for rank in range(3)] == [(0, 3), (3, 6), (6, 10)]
    rows = torch.arange(6.0).view(3, 2)
    assert torch.equal(gather_on_main(rows), rows) and torch.equal(all_gather_cat(rows), rows)
    train, queries = reference_points()
    distances, indices = sharded_search(NearestNeighborIndex(train[40:]), 40, queries, k=2)
    expected = NearestNeighborIndex(train[40:]).search(queries, k=2)
    assert torch.equal(indices, expected[1] + 40) and torch.equal(distances, expected[0])
    assert main_process_result(lambda: "result") == "result"
    with pytest.raises(ValueError, match="rank=3"):
        shard_bounds(10, 3, 3)
    with pytest.raises(ValueError, match="offset"):
        sharded_search(NearestNeighborIndex(train), -1, queries)


if __name__ == "__main__":
    run_worker(sys.argv[1])
