"""Algorithm 2 (head-mask gradients) vs exhaustive drop-one-head ablation: time for all head scores, and agreement.

What: a CIFAR-like DiT (32x32x3, patch 2 -> 256 tokens, 6 layers, 6 heads of 64 = 36 heads, 10 classes) with random
weights perturbed so every head matters (DiT zero-initialises its adaLN gates), random CIFAR-sized images in [-1, 1];
both methods see the SAME batches, noise and timesteps (t ~ Beta(0.8, 2) on normalised time), float32, CPU.
How: wall time of ``small_time_head_importance`` (one forward + backward per batch) and of
``ablation_head_importance`` (one forward per batch and head, plus a base forward), measured one after the other in
this run; Spearman rank correlation between the two score vectors (SciPy). Against what: the ratio of the times and
the ratio of forward-pass equivalents (36 + 1 forwards vs ~3 for forward + backward). No time is asserted.

    python benchmarks/bench_head_importance.py [--batches 2] [--batch_size 16]
"""

import argparse
import time

import scipy.stats
import torch

from diffusers_memsep import PrunableDiTTransformer2DModel
from diffusers_memsep.data import TrainingData
from diffusers_memsep.pruning import ablation_head_importance, small_time_head_importance
from diffusers_memsep.trainer import make_noise_scheduler

CONFIG = dict(sample_size=32, in_channels=3, patch_size=2, num_layers=6, num_attention_heads=6, attention_head_dim=64,
              num_embeds_ada_norm=10, norm_num_groups=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = PrunableDiTTransformer2DModel(**CONFIG).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    data = TrainingData(images=torch.rand(256, 3, 32, 32) * 2 - 1, labels=torch.randint(0, 10, (256,)),
                        num_classes=10, source="random CIFAR-sized images")
    scheduler = make_noise_scheduler()
    kwargs = dict(num_batches=args.batches, batch_size=args.batch_size)

    start = time.perf_counter()
    gradient = small_time_head_importance(model, data, scheduler, generator=torch.Generator().manual_seed(0), **kwargs)
    gradient_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ablation = ablation_head_importance(model, data, scheduler, generator=torch.Generator().manual_seed(0), **kwargs)
    ablation_seconds = time.perf_counter() - start

    rho = scipy.stats.spearmanr(gradient.scores.flatten().numpy(), ablation.scores.flatten().numpy()).statistic
    rho_raw = scipy.stats.spearmanr(gradient.raw_scores.flatten().numpy(), ablation.scores.flatten().numpy()).statistic
    heads = CONFIG["num_layers"] * CONFIG["num_attention_heads"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32; config {CONFIG}")
    print(f"{args.batches} batches of {args.batch_size}, same batches/noise/timesteps for both, t ~ Beta(0.8, 2)")
    print(f"Algorithm 2 (mask gradients): {gradient_seconds:8.2f} s for all {heads} heads")
    print(f"exhaustive ablation         : {ablation_seconds:8.2f} s ({heads} + 1 forwards per batch)")
    print(f"speed-up of Algorithm 2     : {ablation_seconds / gradient_seconds:8.1f}x")
    print(f"Spearman rank correlation, Algorithm 2 I(h) (layer-normalised) vs ablation: {rho:.3f}")
    print(f"Spearman rank correlation, Algorithm 2 S(h) (raw) vs ablation:              {rho_raw:.3f}")


if __name__ == "__main__":
    main()
