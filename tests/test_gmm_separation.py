"""Tests of the Gaussian-mixture approximation-separation experiments."""

import csv
import json
import math
import os

import pytest
import torch

from diffusers_memsep.cli import main
from diffusers_memsep.experiments import (
    GMMRunSpec,
    GMMScoreMLP,
    GMMTrainConfig,
    capacity_thresholds,
    evaluate_samples,
    fit_threshold_growth,
    generate_samples,
    gmm_dsm_loss,
    make_mixture,
    parse_sweep_argument,
    run_gmm_suite,
    run_sweep,
    sample_diffusion_times,
    suite_specs,
    sweep_specs,
    train_score_mlp,
)
from diffusers_memsep.memorization import memorization_ratio
from diffusers_memsep.theory import GaussianMixture, ou_alpha_sigma, reverse_sde_sample

TINY = dict(dim=3, num_components=2, num_train=6, width=8, depth=2, steps=5, batch_size=16, num_samples=32,
            sample_steps=5)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------ the MLP
@pytest.mark.parametrize("dim, width, depth, frequencies", [(2, 16, 1, 8), (8, 32, 3, 4), (5, 7, 4, 1)])
def test_mlp_shapes_and_parameter_count(dim, width, depth, frequencies):
    model = GMMScoreMLP(dim, width, depth, num_time_frequencies=frequencies)
    by_hand = ((dim + 2 * frequencies) * width + width) + (depth - 1) * (width * width + width) + (width * dim + dim)
    assert model.num_parameters() == by_hand == GMMScoreMLP.parameter_count(dim, width, depth, frequencies)
    x = torch.randn(5, dim)
    assert model(x, 0.3).shape == (5, dim)
    assert model(x, torch.full((5,), 0.3)).shape == (5, dim)
    torch.testing.assert_close(model(x, 0.3), model(x, torch.full((5,), 0.3)))


def test_score_is_minus_noise_over_sigma():
    torch.manual_seed(0)
    model = GMMScoreMLP(3, 16, 2)
    torch.nn.init.normal_(model.out.weight)  # the output layer starts at zero; make the check non-trivial
    x, t = torch.randn(4, 3), torch.tensor([0.01, 0.1, 1.0, 5.0])
    _, sigma = ou_alpha_sigma(t)
    torch.testing.assert_close(model.score(x, t), -model(x, t) / sigma[:, None])
    assert model(x, t).abs().sum() > 0


def test_mlp_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = GMMScoreMLP(4, 12, 2, data_std=2.5)
    torch.nn.init.normal_(model.out.weight)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = GMMScoreMLP.from_pretrained(tmp_path)
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x, 0.2), model(x, 0.2))
    assert loaded.config.data_std == 2.5


@pytest.mark.parametrize("kwargs", [dict(dim=0), dict(dim=2, width=0), dict(dim=2, depth=-1), dict(dim=2.5),
                                    dict(dim=2, data_std=0.0)])
def test_mlp_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="must be"):
        GMMScoreMLP(**kwargs)


def test_mlp_rejects_dimension_mismatch_and_bad_times():
    model = GMMScoreMLP(3, 8, 1)
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        model(torch.randn(4, 2), 0.5)
    with pytest.raises(ValueError, match="> 0"):
        model(torch.randn(4, 3), 0.0)
    with pytest.raises(ValueError, match="times for 4 points"):
        model(torch.randn(4, 3), torch.ones(3))


# ------------------------------------------------------------------------------------------------ DSM training
def test_dsm_loss_mirrors_the_paper():
    torch.manual_seed(0)
    model = GMMScoreMLP(3, 16, 2)
    torch.nn.init.normal_(model.out.weight)
    x0, noise = torch.randn(64, 3), torch.randn(64, 3)
    t = sample_diffusion_times(64, 1e-3, 10.0, torch.Generator().manual_seed(0))
    alpha, sigma = ou_alpha_sigma(t)
    x_t = alpha[:, None] * x0 + sigma[:, None] * noise
    # Paper's l_t(x, s) with the true conditional score -(X_t - alpha x)/sigma^2 = -noise/sigma, weighted sigma^2 ...
    paper = (sigma**2 * ((-noise / sigma[:, None] - model.score(x_t, t)) ** 2).sum(1)).mean()
    # ... equals plain noise prediction.
    eps_form = ((model(x_t, t) - noise) ** 2).sum(1).mean()
    torch.testing.assert_close(gmm_dsm_loss(model, x0, t, noise), paper)
    torch.testing.assert_close(gmm_dsm_loss(model, x0, t, noise), eps_form, rtol=1e-4, atol=1e-5)


def test_diffusion_times_are_log_uniform():
    t = sample_diffusion_times(20000, 1e-3, 10.0, torch.Generator().manual_seed(0))
    assert t.min() >= 1e-3 and t.max() <= 10.0
    # log-uniform: the median is the geometric mean of the ends, and each decade gets a quarter of the mass
    assert abs(t.log().median().item() - 0.5 * (math.log(1e-3) + math.log(10.0))) < 0.1
    assert abs((t < 1e-2).float().mean().item() - 0.25) < 0.02


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    mixture = GaussianMixture(torch.tensor([[2.0, 0.0], [-2.0, 0.0]]))
    train = mixture.sample(32, generator=torch.Generator().manual_seed(0))
    model = GMMScoreMLP(2, 32, 2)
    generator = torch.Generator().manual_seed(1)
    x0 = train[torch.randint(32, (2048,), generator=generator)]
    t = sample_diffusion_times(2048, 1e-3, 10.0, generator)
    noise = torch.randn(2048, 2, generator=generator)
    with torch.no_grad():
        before = gmm_dsm_loss(model, x0, t, noise).item()
    losses = train_score_mlp(model, train, GMMTrainConfig(steps=150, batch_size=64, learning_rate=3e-3))
    with torch.no_grad():
        after = gmm_dsm_loss(model, x0, t, noise).item()
    assert len(losses) == 150 and all(math.isfinite(v) for v in losses)
    assert before == pytest.approx(2.0, rel=0.1)  # zero-initialised output: E||noise||^2 = d
    assert after < 0.85 * before


def test_one_optimizer_step_lowers_the_batch_loss():
    torch.manual_seed(0)
    model = GMMScoreMLP(2, 32, 2)
    x0, noise = torch.randn(256, 2), torch.randn(256, 2)
    t = sample_diffusion_times(256, 1e-3, 10.0, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = gmm_dsm_loss(model, x0, t, noise)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert gmm_dsm_loss(model, x0, t, noise) < before


def test_training_rejects_dimension_mismatch_and_empty_set():
    model = GMMScoreMLP(3, 8, 1)
    with pytest.raises(ValueError, match="d = 2"):
        train_score_mlp(model, torch.randn(5, 2), GMMTrainConfig(steps=1))
    with pytest.raises(ValueError, match="non-empty"):
        train_score_mlp(model, torch.zeros(0, 3), GMMTrainConfig(steps=1))
    with pytest.raises(ValueError, match="positive integer"):
        GMMTrainConfig(steps=0)
    with pytest.raises(ValueError, match="t_max > t_min"):
        GMMTrainConfig(t_min=1.0, t_max=0.5)


def test_trained_network_memorizes_few_points_while_true_score_does_not():
    """The separation end to end: 300 DSM steps on 4 points in d = 8 make the network reproduce them; the exact
    score of the data distribution, with the same sampler, does not."""
    dim = 8
    mixture = GaussianMixture(torch.zeros(1, dim))
    train = mixture.sample(4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = GMMScoreMLP(dim, 64, 2)
    train_score_mlp(model, train, GMMTrainConfig(steps=300, batch_size=64, learning_rate=1e-2, t_min=1e-2))
    learned = generate_samples(model, 200, t_min=1e-2, num_steps=50, generator=torch.Generator().manual_seed(1))
    x_T = torch.randn(200, dim, generator=torch.Generator().manual_seed(1))
    true = reverse_sde_sample(mixture.score, x_T, 10.0, 1e-2, 50, generator=torch.Generator().manual_seed(2),
                              return_denoised=True)
    assert memorization_ratio(learned, train) > 0.4
    assert memorization_ratio(true, train) < 0.05


# ------------------------------------------------------------------------------------------------------ metrics
def test_evaluate_samples_on_copies_and_on_fresh_points():
    mixture = make_mixture(4, 3, seed=0)
    train = mixture.sample(10, generator=torch.Generator().manual_seed(0))
    copies = evaluate_samples(train.clone(), train, mixture)
    assert copies["memorization_ratio"] == 1.0 and copies["memorized"].all()
    assert copies["mean_log_likelihood"] == pytest.approx(mixture.log_prob(train, 0.0).mean().item())
    midpoints = 0.5 * (train[:5] + train[5:])  # equidistant from two training points: never a copy
    assert evaluate_samples(midpoints, train, mixture)["memorization_ratio"] == 0.0
    with pytest.raises(ValueError, match="same d"):
        evaluate_samples(torch.randn(3, 2), train, mixture)


def test_make_mixture_layouts():
    square = make_mixture(2, 4, mean_scale=2.0, layout="square")
    assert sorted(square.means.abs().flatten().tolist()) == [4.0] * 8
    random = make_mixture(8, 8, mean_scale=2.0, seed=1)
    assert random.means.shape == (8, 8)
    torch.testing.assert_close(random.means, make_mixture(8, 8, mean_scale=2.0, seed=1).means)
    with pytest.raises(ValueError, match="d = 2, K = 4"):
        make_mixture(3, 4, layout="square")
    with pytest.raises(ValueError, match="unknown mixture layout"):
        make_mixture(2, 4, layout="ring")


# ------------------------------------------------------------------------------------------ capacity threshold
def _rows(curves):
    return [{"num_train": n, "width": w, "memorization_ratio": r} for n, curve in curves.items() for w, r in curve]


def test_capacity_threshold_interpolates_in_log_width():
    rows = _rows({10: [(16, 0.1), (32, 0.3), (64, 0.7)], 20: [(16, 0.6), (32, 0.9)], 40: [(16, 0.0), (32, 0.2)]})
    by_n = {t["num_train"]: t for t in capacity_thresholds(rows)}
    assert by_n[10]["threshold"] == pytest.approx(math.exp(math.log(32) + 0.5 * math.log(2)))  # halfway 32..64
    assert by_n[10]["first_width_above"] == 64 and not by_n[10]["censored"]
    assert by_n[20]["threshold"] == 16 and by_n[20]["censored"]
    assert math.isnan(by_n[40]["threshold"])
    with pytest.raises(ValueError, match="level"):
        capacity_thresholds(rows, level=1.5)
    with pytest.raises(ValueError, match="memorization_ratio"):
        capacity_thresholds([{"num_train": 1, "width": 2}])


def test_threshold_growth_fit_recovers_a_power_law():
    ns = [10, 20, 40, 80]
    fit = fit_threshold_growth(ns + [160], [3.0 * n**1.3 for n in ns] + [float("nan")])
    assert fit.exponent == pytest.approx(1.3) and fit.prefactor == pytest.approx(3.0)
    assert fit.r_squared == pytest.approx(1.0) and fit.points == 4
    with pytest.raises(ValueError, match="at least two"):
        fit_threshold_growth([10, 20], [5.0, float("nan")])


# -------------------------------------------------------------------------------------------------- sweeps, CLI
def test_run_spec_rejects_bad_sizes():
    for name, value in [("num_train", 0), ("num_train", -3), ("width", 0), ("dim", 0), ("steps", 0)]:
        with pytest.raises(ValueError, match=name):
            GMMRunSpec(**{name: value})
    with pytest.raises(ValueError, match="second nearest"):
        GMMRunSpec(num_train=1)


def test_sweep_specs_and_unknown_parameters():
    specs = sweep_specs(GMMRunSpec(**TINY), {"width": [4, 8], "num_train": [5, 6, 7]})
    assert [(s.width, s.num_train) for s in specs] == [(w, n) for w in (4, 8) for n in (5, 6, 7)]
    with pytest.raises(ValueError, match="unknown sweep parameter.*'heads'"):
        sweep_specs(GMMRunSpec(**TINY), {"heads": [1, 2]})
    with pytest.raises(ValueError, match="non-empty list"):
        sweep_specs(GMMRunSpec(**TINY), {"width": []})
    assert parse_sweep_argument("weight_decay=0, 0.1") == ("weight_decay", [0.0, 0.1])
    assert parse_sweep_argument("width=4,8") == ("width", [4, 8])
    with pytest.raises(ValueError, match="unknown sweep parameter 'size'"):
        parse_sweep_argument("size=1,2")
    with pytest.raises(ValueError, match="int values"):
        parse_sweep_argument("width=4.5")
    with pytest.raises(ValueError, match="NAME=V1,V2"):
        parse_sweep_argument("width")
    with pytest.raises(ValueError, match="unknown scale"):
        suite_specs("huge")


def test_tiny_sweep_runs_in_seconds():
    rows = run_sweep(GMMRunSpec(**TINY), {"width": [4, 8], "weight_decay": [0.0, 0.5]}, workers=1, progress=False)
    assert [(r["width"], r["weight_decay"]) for r in rows] == [(4, 0.0), (4, 0.5), (8, 0.0), (8, 0.5)]
    for row in rows:
        assert 0.0 <= row["memorization_ratio"] <= 1.0 and math.isfinite(row["mean_log_likelihood"])
        assert row["num_parameters"] == GMMScoreMLP.parameter_count(3, row["width"], 2)
    again = run_sweep(GMMRunSpec(**TINY), {"width": [4]}, workers=1, progress=False)
    assert again[0]["memorization_ratio"] == rows[0]["memorization_ratio"]  # seeded: reproducible


def test_tiny_suite_writes_every_output(tmp_path):
    summary = run_gmm_suite(str(tmp_path), scale="tiny", workers=1, progress=False, steps=3, num_samples=16)
    for name in ("gmm_runs.csv", "gmm_capacity_threshold.csv", "gmm_summary.json", "gmm_figure2.png",
                 "gmm_figure3a.png", "gmm_figure3b.png", "gmm_capacity_threshold.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "gmm_runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["figure"] for row in rows} == {"figure2", "size_by_n", "dim_by_n", "weight_decay_by_n"}
    assert json.loads((tmp_path / "gmm_summary.json").read_text())["runs"] == summary["runs"]
    with open(tmp_path / "gmm_capacity_threshold.csv") as handle:
        thresholds = list(csv.DictReader(handle))
    assert [int(t["num_train"]) for t in thresholds] == [8, 16] and "threshold_parameters" in thresholds[0]
    assert {"fit", "fit_parameters"} <= set(summary)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]  # atomic writes cleaned up
    (tmp_path / "gmm_figure2.png").unlink()
    assert main(["gmm", "--output_dir", str(tmp_path), "--replot"]) == 0  # redraw from the files, no training
    assert (tmp_path / "gmm_figure2.png").stat().st_size > 0
    replotted = json.loads((tmp_path / "gmm_summary.json").read_text())
    assert [t["num_train"] for t in replotted["thresholds"]] == [t["num_train"] for t in summary["thresholds"]]
    assert replotted["figure2"] == summary["figure2"]
    assert main(["gmm", "--output_dir", str(tmp_path / "empty"), "--replot"]) == 2  # nothing to redraw: clear error


def test_cli_custom_sweep_and_bad_sweep(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["gmm", "--output_dir", str(out), "--workers", "1", "--no_progress", "--sweep", "width=4,8",
                 "--set", "dim=3", "--set", "num_train=5", "--set", "num_samples=16", "--set", "sample_steps=4",
                 "--steps", "3"])
    assert code == 0
    with open(out / "gmm_sweep.csv") as handle:
        assert [int(row["width"]) for row in csv.DictReader(handle)] == [4, 8]
    assert (out / "gmm_sweep.png").exists()
    assert main(["gmm", "--output_dir", str(out), "--sweep", "heads=1,2"]) == 2
    assert "unknown sweep parameter 'heads'" in capsys.readouterr().err
    assert main(["gmm", "--output_dir", str(out), "--sweep", "num_train=0,5", "--set", "steps=1"]) == 2
