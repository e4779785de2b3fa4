"""Forward time of a DiT with 50% of its heads physically pruned vs the unpruned model (and vs a soft mask).

What: CIFAR-like DiT (32x32x3 input, patch 2 -> 256 tokens, 6 layers, 6 heads of 64, 10 classes), batch 8,
float32, inference mode, on this machine's CPU. Three variants measured side by side in one run, called in turn
(round robin), each timed by its minimum and median over the repetitions: the unpruned model, the same model with
a soft head mask that zeroes 50% of the heads (saves nothing: the heads are still computed), and a copy with the
same heads physically removed (3 of 6 in every layer).
Against what: the ratio of multiply-accumulates (MACs) counted analytically for the attention part (q/k/v/out
projections + QK^T + AV) and for the whole forward pass. No wall time is asserted anywhere.

    python benchmarks/bench_pruned_dit.py [--batch 8] [--repeats 10]
"""

import argparse
import copy
import statistics
import time

import torch

from diffusers_memsep import PrunableDiTTransformer2DModel

CONFIG = dict(sample_size=32, in_channels=3, patch_size=2, num_layers=6, num_attention_heads=6, attention_head_dim=64,
              num_embeds_ada_norm=10, norm_num_groups=32)


def forward_macs(model: PrunableDiTTransformer2DModel, batch: int) -> tuple[int, int]:
    """(attention MACs, total MACs of the transformer blocks) for one forward pass, counted from the shapes."""
    tokens = (CONFIG["sample_size"] // CONFIG["patch_size"]) ** 2
    width = model.inner_dim
    attention = total = 0
    for block in model.transformer_blocks:
        inner = block.attn1.to_q.out_features
        layer_attention = tokens * width * inner * 4 + 2 * tokens * tokens * inner  # q,k,v,out + QK^T + AV
        mlp = 2 * tokens * width * block.ff.net[0].proj.out_features
        attention += layer_attention
        total += layer_attention + mlp
    return batch * attention, batch * total


def time_round_robin(models: dict, inputs, repeats: int) -> dict[str, list[float]]:
    """Seconds per forward pass of each model, calling the models in turn so that load drifts hit all alike."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model(*inputs)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(*inputs)
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    full = PrunableDiTTransformer2DModel(**CONFIG).eval()
    generator = torch.Generator().manual_seed(1)
    half = {layer: torch.randperm(6, generator=generator)[:3].tolist() for layer in range(CONFIG["num_layers"])}
    mask = torch.ones(CONFIG["num_layers"], CONFIG["num_attention_heads"])
    for layer, heads in half.items():
        mask[layer, heads] = 0.0
    masked = copy.deepcopy(full)
    masked.set_head_mask(mask)
    pruned = copy.deepcopy(full)
    pruned.prune_heads(half)

    inputs = (torch.randn(args.batch, 3, 32, 32), torch.randint(0, 1000, (args.batch,)),
              torch.randint(0, 10, (args.batch,)))
    with torch.inference_mode():
        torch.testing.assert_close(pruned(*inputs).sample, masked(*inputs).sample, rtol=1e-4, atol=1e-4)

    times = time_round_robin({"unpruned": full, "soft mask 50%": masked, "physical 50%": pruned}, inputs, args.repeats)
    # The minimum is the least disturbed by other processes on the machine; the median is shown beside it.
    best = {name: min(values) for name, values in times.items()}
    medians = {name: statistics.median(values) for name, values in times.items()}

    attention_full, total_full = forward_macs(full, args.batch)
    attention_pruned, total_pruned = forward_macs(pruned, args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU float32, batch {args.batch}, "
          f"config {CONFIG}")
    print(f"parameters: unpruned {full.num_parameters():,}, pruned {pruned.num_parameters():,}")
    print(f"{args.repeats} round-robin repetitions; ratios of the minimum (and of the median) time per forward:")
    for name in times:
        print(f"{name:>14}: min {best[name] * 1e3:7.1f} ms, median {medians[name] * 1e3:7.1f} ms   ratio vs unpruned "
              f"{best[name] / best['unpruned']:.3f} ({medians[name] / medians['unpruned']:.3f})")
    print(f"analytic MAC ratio pruned/unpruned: attention {attention_pruned / attention_full:.3f}, "
          f"transformer blocks {total_pruned / total_full:.3f}")


if __name__ == "__main__":
    main()
