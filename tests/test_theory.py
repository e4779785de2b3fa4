"""Tests of diffusers_memsep.theory against independent computations (autograd, brute-force loops, closed forms,
torch.distributions), plus their bad inputs."""

import csv
import math

import pytest
import torch

from diffusers_memsep.theory import (
    EmpiricalScore,
    GaussianMixture,
    LossGapEstimate,
    fisher_divergence,
    loss_gap,
    ou_alpha_sigma,
    ou_time_from_alphas_cumprod,
    probability_flow_ode_sample,
    reverse_sde_sample,
    theorem_4_3_lower_bound,
    time_grid,
    timesteps_from_fraction,
    timesteps_from_ou_time,
)

f64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tests run many small ops, which 2 OpenMP threads on a shared, busy CPU slow down up to 20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def brute_force_memorization_ratio(samples, train):
    """The paper's rule, independently of diffusers_memsep.memorization: ||x - x_(1)||^2 <= ||x - x_(2)||^2 / 9."""
    squared = torch.cdist(samples.double(), train.double()) ** 2
    nearest = squared.topk(2, dim=1, largest=False).values
    return (nearest[:, 0] <= nearest[:, 1] / 9).double().mean().item()


def random_spd(dim, gen):
    a = torch.randn(dim, dim, generator=gen, dtype=f64)
    return a @ a.T / dim + 0.3 * torch.eye(dim, dtype=f64)


# ----------------------------------------------------------------------------------------------------------- time
def test_ou_alpha_sigma_float_and_tensor():
    alpha, sigma = ou_alpha_sigma(0.7)
    assert alpha == pytest.approx(math.exp(-0.35)) and sigma == pytest.approx(math.sqrt(1 - math.exp(-0.7)))
    t = torch.tensor([1e-8, 0.1, 1.0, 10.0], dtype=f64)
    alpha, sigma = ou_alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    assert sigma[0].item() == pytest.approx(1e-4, rel=1e-6)  # expm1 keeps sigma_t ~ sqrt(t) accurate at tiny t
    with pytest.raises(ValueError, match="t_0"):
        ou_alpha_sigma(-0.1)


def test_diffusers_timestep_round_trip():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    k = torch.tensor([0, 1, 10, 500, 999])
    t = ou_time_from_alphas_cumprod(scheduler.alphas_cumprod, k)
    torch.testing.assert_close(torch.exp(-t), scheduler.alphas_cumprod[k].double())  # alpha_t^2 = alphas_cumprod[k]
    assert torch.all(t[1:] > t[:-1])
    assert torch.equal(timesteps_from_ou_time(scheduler, t), k)  # the scheduler itself is accepted too
    # a time between two grid points maps to the nearer one
    mid = 0.25 * t[2] + 0.75 * ou_time_from_alphas_cumprod(scheduler.alphas_cumprod, 11)
    assert timesteps_from_ou_time(scheduler.alphas_cumprod, mid).item() == 11
    with pytest.raises(ValueError, match="indices"):
        ou_time_from_alphas_cumprod(scheduler.alphas_cumprod, 1000)


def test_timesteps_from_fraction():
    fraction = torch.tensor([0.0, 0.2, 0.4999, 1.0])
    assert timesteps_from_fraction(fraction, 1000).tolist() == [0, 200, 499, 999]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        timesteps_from_fraction(1.5, 1000)


def test_time_grid():
    grid = time_grid(2.0, 1e-3, 10)
    assert grid.shape == (11,) and grid[0] == 2.0 and grid[-1].item() == pytest.approx(1e-3)
    ratios = grid[1:] / grid[:-1]
    torch.testing.assert_close(ratios, ratios[0].expand_as(ratios))  # geometric
    torch.testing.assert_close(time_grid(1.0, 0.5, 2, "uniform"), torch.tensor([1.0, 0.75, 0.5], dtype=f64))
    with pytest.raises(ValueError, match="t_min"):
        time_grid(1.0, 0.0, 10)
    with pytest.raises(ValueError, match="exceed"):
        time_grid(0.1, 1.0, 10)


# -------------------------------------------------------------------------------------------------------- mixture
def _mixtures():
    gen = generator(1)
    dim = 3
    yield GaussianMixture.random(4, dim, generator=gen, dtype=f64)
    means = torch.randn(3, dim, generator=gen, dtype=f64) * 2
    covs = torch.stack([random_spd(dim, gen) for _ in range(3)])
    yield GaussianMixture(means, covs, torch.tensor([0.2, 0.5, 0.3], dtype=f64))
    yield GaussianMixture(means, random_spd(dim, gen), torch.tensor([1.0, 2.0, 1.0], dtype=f64))  # shared cov


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("t", [0.0, 0.05, 0.8, 4.0])
def test_mixture_log_prob_and_score_against_torch_distributions_and_autograd(index, t):
    mixture = list(_mixtures())[index]
    x = torch.randn(16, mixture.dim, generator=generator(2), dtype=f64) * 3
    # independent density: torch.distributions with the noised components N(a mu, a^2 Sigma + s^2 I)
    alpha, sigma = ou_alpha_sigma(t)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=mixture.weights),
        torch.distributions.MultivariateNormal(alpha * mixture.means,
                                               alpha**2 * mixture.covs + sigma**2 * torch.eye(mixture.dim, dtype=f64)))
    torch.testing.assert_close(mixture.log_prob(x, t), reference.log_prob(x))
    x.requires_grad_(True)
    (autograd_score,) = torch.autograd.grad(reference.log_prob(x).sum(), x)
    torch.testing.assert_close(mixture.score(x.detach(), t), autograd_score)


def test_mixture_sampling_moments_and_reproducibility():
    gen = generator(3)
    means = torch.tensor([[4.0, 0.0], [-4.0, 1.0]], dtype=f64)
    covs = torch.stack([torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=f64), 0.25 * torch.eye(2, dtype=f64)])
    mixture = GaussianMixture(means, covs, torch.tensor([0.25, 0.75], dtype=f64))
    x, components = mixture.sample(40000, generator=gen, return_components=True)
    assert x.shape == (40000, 2) and components.shape == (40000,)
    assert (components == 0).double().mean().item() == pytest.approx(0.25, abs=0.01)
    for k in range(2):
        part = x[components == k]
        torch.testing.assert_close(part.mean(0), means[k], atol=0.05, rtol=0)
        torch.testing.assert_close(torch.cov(part.T), covs[k], atol=0.06, rtol=0)
    torch.testing.assert_close(mixture.sample(5, generator=generator(9)), mixture.sample(5, generator=generator(9)))


def test_mixture_random_matches_paper_setting():
    mixture = GaussianMixture.random(8, 512, generator=generator(4))
    assert mixture.num_components == 8 and mixture.dim == 512
    assert mixture.means.std().item() == pytest.approx(2.0, rel=0.05)  # mu_k ~ N(0, 4 I)
    assert mixture.trace_cov == pytest.approx(512.0)
    torch.testing.assert_close(mixture.weights, torch.full((8,), 1 / 8))


# ------------------------------------------------------------------------------------------------ empirical score
def brute_force_empirical(train, x, t):
    """Loops over queries and training points; float64; returns (weights, denoised, score, log_density)."""
    alpha, sigma = ou_alpha_sigma(t)
    n, d = train.shape
    weights = torch.zeros(len(x), n, dtype=f64)
    log_density = torch.zeros(len(x), dtype=f64)
    for b in range(len(x)):
        exponents = [-float(((x[b] - alpha * train[i]) ** 2).sum()) / (2 * sigma**2) for i in range(n)]
        top = max(exponents)
        total = sum(math.exp(e - top) for e in exponents)
        for i in range(n):
            weights[b, i] = math.exp(exponents[i] - top) / total
        log_density[b] = top + math.log(total) - math.log(n) - 0.5 * d * math.log(2 * math.pi * sigma**2)
    denoised = weights @ train
    score = -(x - alpha * denoised) / sigma**2
    return weights, denoised, score, log_density


@pytest.mark.parametrize("t", [1e-3, 0.05, 0.5, 5.0])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_empirical_score_matches_brute_force(t, chunk_size):
    gen = generator(5)
    train = torch.randn(7, 3, generator=gen, dtype=f64)
    x = torch.cat([ou_alpha_sigma(t)[0] * train[:3] + 0.1 * torch.randn(3, 3, generator=gen, dtype=f64),
                   3 * torch.randn(5, 3, generator=gen, dtype=f64)])
    empirical = EmpiricalScore(train, chunk_size=chunk_size)
    weights, denoised, score, log_density = brute_force_empirical(train, x, t)
    mean, got_weights = empirical.denoise(x, t, return_weights=True)
    torch.testing.assert_close(got_weights, weights)
    torch.testing.assert_close(mean, denoised)
    torch.testing.assert_close(empirical.denoise(x, t), denoised)
    torch.testing.assert_close(empirical.score(x, t), score, rtol=1e-7, atol=1e-7 / ou_alpha_sigma(t)[1] ** 2)
    torch.testing.assert_close(empirical.log_prob(x, t), log_density)


def test_empirical_score_is_gradient_of_its_log_density():
    train = torch.randn(11, 4, generator=generator(6), dtype=f64)
    x = torch.randn(6, 4, generator=generator(7), dtype=f64).requires_grad_(True)
    alpha, sigma = ou_alpha_sigma(0.3)
    # independent density: torch.distributions mixture of N(alpha x_i, sigma^2 I)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=torch.full((11,), 1 / 11, dtype=f64)),
        torch.distributions.Independent(torch.distributions.Normal(alpha * train, sigma), 1))
    (autograd_score,) = torch.autograd.grad(reference.log_prob(x).sum(), x)
    torch.testing.assert_close(EmpiricalScore(train, chunk_size=4).score(x.detach(), 0.3), autograd_score)


def test_empirical_score_float32_large_n_and_image_shapes():
    gen = generator(8)
    train = torch.randn(5000, 2, 4, 4, generator=gen)  # image-shaped: flattened inside, shape restored on output
    x = torch.randn(9, 2, 4, 4, generator=gen)
    empirical32 = EmpiricalScore(train, chunk_size=512)
    empirical64 = EmpiricalScore(train.double(), chunk_size=5000)
    for t in (0.1, 1.0):
        got = empirical32.score(x, t)
        assert got.shape == x.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), empirical64.score(x.double(), t), rtol=1e-3, atol=1e-3)
    mean, weights = empirical32.denoise(x, 0.1, return_weights=True)
    assert weights.shape == (9, 5000)
    torch.testing.assert_close(weights.sum(1), torch.ones(9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_empirical_score_on_cuda_matches_cpu():
    train = torch.randn(3000, 5, generator=generator(12))
    x = torch.randn(17, 5, generator=generator(13))
    cpu = EmpiricalScore(train, chunk_size=700).score(x, 0.2)
    torch.testing.assert_close(EmpiricalScore(train.cuda(), chunk_size=700).score(x.cuda(), 0.2).cpu(), cpu,
                               rtol=1e-4, atol=1e-4)


def test_empirical_denoiser_copies_the_nearest_training_point_at_small_t():
    train = torch.randn(50, 8, generator=generator(10), dtype=f64)
    t = 1e-3
    alpha, sigma = ou_alpha_sigma(t)
    x = alpha * train[[3, 17, 42]] + sigma * torch.randn(3, 8, generator=generator(11), dtype=f64)
    mean, weights = EmpiricalScore(train).denoise(x, t, return_weights=True)
    assert weights.argmax(1).tolist() == [3, 17, 42] and weights.max(1).values.min() > 0.999
    torch.testing.assert_close(mean, train[[3, 17, 42]], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------- Loss-Gap = Fisher (Prop. 4.1)
@pytest.mark.parametrize(
    "num_components,dim,n,t",
    [(4, 2, 30, 0.05), (4, 2, 30, 1.0), (8, 5, 200, 0.02), (8, 5, 200, 0.3), (3, 16, 100, 0.1), (8, 16, 1000, 1.5)],
)
def test_proposition_4_1_loss_gap_equals_fisher_divergence(num_components, dim, n, t):
    mixture = GaussianMixture.random(num_components, dim, generator=generator(dim + n), dtype=f64)
    train = mixture.sample(n, generator=generator(12))
    gap = loss_gap(train, mixture.score, t, num_noise_samples=4096, generator=generator(13))
    fisher = fisher_divergence(train, mixture.score, t, num_noise_samples=4096, generator=generator(14))
    assert isinstance(gap, LossGapEstimate) and gap.num_samples == 4096
    assert gap.stderr > 0 and fisher.stderr > 0
    assert abs(gap.value - fisher.value) <= 3 * math.hypot(gap.stderr, fisher.stderr), (gap, fisher)


@pytest.mark.parametrize("t", [0.01, 0.5, 3.0])
def test_loss_gap_and_fisher_against_closed_form_single_point(t):
    """n = 1 and P = N(0, I): p_hat_t = N(a x_1, s^2 I), p_t = N(0, I), so
    Fisher = E||-eps/s + a x_1 + s eps||^2 = a^2 ||x_1||^2 + d (s - 1/s)^2 exactly."""
    dim = 6
    mixture = GaussianMixture(torch.zeros(1, dim, dtype=f64))
    train = torch.randn(1, dim, generator=generator(15), dtype=f64)
    alpha, sigma = ou_alpha_sigma(t)
    exact = alpha**2 * train.pow(2).sum().item() + dim * (sigma - 1 / sigma) ** 2
    for estimator, seed in ((loss_gap, 16), (fisher_divergence, 17)):
        estimate = estimator(train, mixture.score, t, num_noise_samples=8192, generator=generator(seed))
        assert abs(estimate.value - exact) <= 4 * estimate.stderr + 1e-9 * exact, (estimator.__name__, estimate, exact)


def test_empirical_score_minimises_the_empirical_loss():
    mixture = GaussianMixture.random(4, 3, generator=generator(18), dtype=f64)
    train = mixture.sample(40, generator=generator(19))
    empirical = EmpiricalScore(train)
    same = loss_gap(train, empirical.score, 0.2, num_noise_samples=512, generator=generator(20))
    assert same.value == pytest.approx(0.0, abs=1e-9)  # the gap of the empirical score to itself is exactly zero
    gap = loss_gap(train, mixture.score, 0.2, num_noise_samples=2048, generator=generator(20))
    assert gap.value > 5 * gap.stderr  # the true score does NOT minimise the empirical loss


def test_theorem_4_3_shape():
    mixture = GaussianMixture.random(8, 10, generator=generator(21), dtype=f64)
    _, sigma = ou_alpha_sigma(0.1)
    assert theorem_4_3_lower_bound(mixture, 0.1) == pytest.approx(10 / sigma**2 + 10)
    assert theorem_4_3_lower_bound(10, 0.1, trace_cov=2.5) == pytest.approx(10 / sigma**2 + 2.5)
    t = torch.tensor([0.1, 1.0], dtype=f64)
    torch.testing.assert_close(theorem_4_3_lower_bound(10, t), 10 / ou_alpha_sigma(t)[1] ** 2 + 10)
    with pytest.raises(ValueError, match="t_0"):
        theorem_4_3_lower_bound(mixture, 0.0)
    with pytest.raises(TypeError, match="GaussianMixture"):
        theorem_4_3_lower_bound("ten", 0.1)


# ------------------------------------------------------------------------------------------------------- samplers
def test_samplers_reproduce_a_gaussian_with_its_exact_score():
    mean = torch.tensor([[2.0, -1.0]], dtype=f64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=f64)
    gaussian = GaussianMixture(mean, cov)
    x_T = torch.randn(8000, 2, generator=generator(22), dtype=f64)
    for samples in (reverse_sde_sample(gaussian.score, x_T, 8.0, 1e-3, 100, generator=generator(23)),
                    probability_flow_ode_sample(gaussian.score, x_T, 8.0, 1e-3, 100)):
        torch.testing.assert_close(samples.mean(0), mean[0], atol=0.06, rtol=0)
        torch.testing.assert_close(torch.cov(samples.T), cov, atol=0.06, rtol=0)


def test_single_point_is_recovered_exactly():
    point = torch.tensor([[0.5, -2.0, 1.0]], dtype=f64)
    x_T = torch.randn(4, 3, generator=generator(24), dtype=f64)
    score = EmpiricalScore(point).score
    out = probability_flow_ode_sample(score, x_T, 5.0, 1e-4, 5, return_denoised=True)
    torch.testing.assert_close(out, point.expand(4, 3))


def test_end_to_end_empirical_score_memorizes_true_score_does_not():
    mixture = GaussianMixture.random(8, 16, generator=generator(25), dtype=f64)
    train = mixture.sample(200, generator=generator(26))
    empirical = EmpiricalScore(train)
    x_T = torch.randn(200, 16, generator=generator(27), dtype=f64)
    kwargs = dict(t_max=8.0, t_min=1e-3, num_steps=60)
    memorizing = reverse_sde_sample(empirical.score, x_T, generator=generator(28), **kwargs)
    generalizing = reverse_sde_sample(mixture.score, x_T, generator=generator(28), **kwargs)
    deterministic = probability_flow_ode_sample(empirical.score, x_T, **kwargs)
    assert brute_force_memorization_ratio(memorizing, train) >= 0.95
    assert brute_force_memorization_ratio(deterministic, train) >= 0.95
    assert brute_force_memorization_ratio(generalizing, train) <= 0.05
    # and the generalizing samples are plausible: their likelihood under the mixture matches fresh data's
    fresh = mixture.sample(200, generator=generator(29))
    assert mixture.log_prob(generalizing).mean() > mixture.log_prob(fresh).mean() - 1.0


# ----------------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    mixture = GaussianMixture.random(3, 4, generator=generator(30), dtype=f64)
    train = mixture.sample(10, generator=generator(31))
    with pytest.raises(ValueError, match="dimension 5 but the model has dimension 4"):
        mixture.score(torch.zeros(2, 5, dtype=f64), 0.1)
    with pytest.raises(ValueError, match="dimension"):
        EmpiricalScore(train).score(torch.zeros(2, 5, dtype=f64), 0.1)
    with pytest.raises(ValueError, match="dimension"):
        loss_gap(torch.zeros(10, 5, dtype=f64), mixture.score, 0.1, num_noise_samples=8)
    for bad_t in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="t_0"):
            EmpiricalScore(train).score(train, bad_t)
        with pytest.raises(ValueError, match="t_0"):
            fisher_divergence(train, mixture.score, bad_t)
    with pytest.raises(ValueError, match="t_0"):
        mixture.score(train, -0.5)
    with pytest.raises(ValueError, match="empty"):
        EmpiricalScore(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="NaN"):
        EmpiricalScore(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixture(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match="NaN"):
        EmpiricalScore(train).score(torch.full((1, 4), float("nan"), dtype=f64), 0.1)
    with pytest.raises(TypeError, match="floating"):
        EmpiricalScore(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="positive definite.*ridge"):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture(torch.zeros(2, 2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="covs must have shape"):
        GaussianMixture(torch.zeros(2, 2), torch.eye(3))
    with pytest.raises(ValueError, match="non-negative"):
        GaussianMixture(torch.zeros(2, 2), weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="shape"):
        loss_gap(train, lambda x, t: x[:, :2], 0.1, num_noise_samples=8)
    with pytest.raises(ValueError, match=">= 2"):
        loss_gap(train, mixture.score, 0.1, num_noise_samples=1)
    with pytest.raises(ValueError, match="shape"):
        reverse_sde_sample(lambda x, t: x.sum(1), torch.zeros(3, 4), 1.0, 0.1, 3)


# ------------------------------------------------------------------------------------------------ Figure 1 command
def test_loss_gap_command_writes_csv_and_png(tmp_path):
    from diffusers_memsep.cli import main

    argv = ["loss-gap", "--output_dir", str(tmp_path), "--dim", "3", "--num_components", "2", "--n_values", "20", "60",
            "--t_min", "0.05", "--t_max", "1.0", "--num_times", "3", "--num_noise_samples", "256"]
    assert main(argv) == 0
    with open(tmp_path / "loss_gap.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6 and {row["n"] for row in rows} == {"20", "60"}
    for row in rows:
        gap, stderr = float(row["loss_gap"]), float(row["loss_gap_stderr"])
        fisher, fisher_stderr = float(row["fisher"]), float(row["fisher_stderr"])
        assert abs(gap - fisher) <= 4 * math.hypot(stderr, fisher_stderr)
    assert (tmp_path / "loss_gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_gap.csv", "loss_gap.png"]  # no temp files left
    assert main(["loss-gap", "--output_dir", str(tmp_path), "--t_min", "0"]) == 2  # bad input: one clear line


def test_training_script_is_the_same_command():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "training" / "loss_gap.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--n_values" in result.stdout and "--num_noise_samples" in result.stdout
