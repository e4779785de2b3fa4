"""The rules every number of the engine obeys: one seed scheme (early-stop curve disjoint from every evaluation),
one rule for non-finite samples, and docs tables that are exactly the committed reports they came from."""

import math
import runpy
from pathlib import Path

import pytest
import torch
from test_study import tiny_config

import diffusers_memsep.evaluate
import diffusers_memsep.trainer.output
from diffusers_memsep.evaluate import CURVE_SEED, EVALUATION_SEED_STRIDE, MAX_RUN_SEED, evaluation_seed
from diffusers_memsep.experiments.gmm import evaluate_samples
from diffusers_memsep.study import run_study
from diffusers_memsep.theory import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]


def test_evaluation_seed_ranges_never_reach_the_curve_seeds():
    last_evaluation_seed = evaluation_seed(MAX_RUN_SEED - 1) + EVALUATION_SEED_STRIDE - 1
    assert last_evaluation_seed < CURVE_SEED
    for bad in (-1, MAX_RUN_SEED, 1.5, True):
        with pytest.raises(ValueError, match="seeds must be integers"):
            evaluation_seed(bad)
    with pytest.raises(ValueError, match="raise batch_size"):  # more batches than seeds of one run
        diffusers_memsep.evaluate.sample_pipeline(None, EVALUATION_SEED_STRIDE + 1, None, 1, 0, batch_size=1)


def test_the_curve_draws_no_sample_of_any_evaluation(tmp_path, monkeypatch):
    """Record every batch seed a tiny study samples from: the checkpoints' curve and the runs never share one."""
    original, drawn = diffusers_memsep.evaluate.sample_pipeline, {"curve": set(), "evaluation": set()}

    def recording(kind):
        def sample(pipe, num_samples, class_labels, num_inference_steps, seed, batch_size=256, **kwargs):
            drawn[kind].update(seed + b for b in range(math.ceil(num_samples / batch_size)))
            return original(pipe, num_samples, class_labels, num_inference_steps, seed, batch_size, **kwargs)
        return sample

    monkeypatch.setattr(diffusers_memsep.trainer.output, "sample_pipeline", recording("curve"))
    monkeypatch.setattr(diffusers_memsep.evaluate, "sample_pipeline", recording("evaluation"))
    run_study(tiny_config(tmp_path, methods=("random",), seeds=(0,), num_workers=1))
    assert drawn["curve"] == {CURVE_SEED} and drawn["evaluation"] == {0}


def test_a_non_finite_sample_is_neither_copy_nor_non_copy():
    train = torch.tensor([[0.0, 0.0], [10.0, 10.0], [0.0, 10.0]])
    mixture = GaussianMixture(train[:2])
    samples = torch.tensor([[0.0, 0.1], [5.0, 4.0], [float("nan"), 0.0]])  # a copy, a non-copy, a diverged sample
    metrics = evaluate_samples(samples, train, mixture)
    assert metrics["memorization_ratio"] == pytest.approx(0.5)  # 1 copy of 2 finite samples, not 1 of 3
    assert metrics["num_nonfinite"] == 1 and metrics["memorized"].tolist() == [True, False, False]
    assert math.isfinite(metrics["mean_log_likelihood"])


def test_docs_tables_are_the_committed_reports():
    """README's and docs/results.md's run tables are what scripts/docs_tables.py renders from the committed reports."""
    docs_tables = runpy.run_path(str(ROOT / "scripts" / "docs_tables.py"))
    for path, expected in docs_tables["render_all"](ROOT).items():
        assert path.read_text() == expected, f"{path}: rerun python scripts/docs_tables.py"
