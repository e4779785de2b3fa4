"""Images/s of the training step of ``train_dit`` (what ``memsep train`` runs) vs a bare PyTorch loop.

Same model (the default digits DiT), same batch, same data, same optimiser, gradient clipping and EMA; rounds
alternate between the two so that load from other processes hits both alike. Reported: median images/s of each over
the rounds, and their ratio (goal >= 0.9). ``train_dit`` is timed by its own step clock (``TrainResult.train_seconds``:
batch drawing, loss, backward, clipping, AdamW, EMA, logging and the progress bar; not the one-off set-up, which
is printed separately). The bare loop is what one would write by hand: index a batch, draw noise and timesteps,
forward, MSE, backward, clip, step, ``torch._foreach_lerp_`` EMA.

    python benchmarks/bench_training.py [--rounds 5 --steps 40 --batch 64 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def bare_loop(model, images, scheduler, steps, batch, lr, seed):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    ema = [p.detach().clone() for p in model.parameters()]
    null = torch.full((batch,), int(model.config.num_embeds_ada_norm))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, images.shape[0], (batch,), generator=generator)
        clean = images[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(model(noisy, timestep=timesteps, class_labels=null).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - 0.999)
        loss.item()
    return steps * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per round and contender.")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n", type=int, default=64, help="Training images (embedded digits).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_memsep.data import load_training_data
    from diffusers_memsep.training import TrainingConfig, make_dit, make_noise_scheduler, train_dit

    data = load_training_data(max_train_samples=args.n, seed=0)
    scheduler = make_noise_scheduler()
    torch.manual_seed(0)
    model = make_dit()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: DiT {model.config.num_layers} layers x {model.config.num_attention_heads} heads of "
          f"{model.config.attention_head_dim}, patch {model.config.patch_size}, {params:,} parameters; "
          f"data: {data.source}; batch {args.batch}; {torch.get_num_threads()} torch threads")
    config = TrainingConfig(max_train_steps=args.steps, train_batch_size=args.batch, lr_warmup_steps=0,
                            show_progress=False, logging_steps=10**9)
    bare_rates, script_rates, overheads = [], [], []
    for round_index in range(args.rounds + 1):  # round 0 warms up both and is not counted
        bare = bare_loop(model, data.images, scheduler, args.steps, args.batch, config.learning_rate, round_index)
        start = time.perf_counter()
        result = train_dit(model, data, scheduler, config)
        total = time.perf_counter() - start
        if round_index:
            bare_rates.append(bare)
            script_rates.append(result.images_per_second)
            overheads.append(total - result.train_seconds)
        print(f"round {round_index}{' (warm-up)' if not round_index else ''}: bare {bare:7.1f} img/s | "
              f"train_dit {result.images_per_second:7.1f} img/s | train_dit set-up + tear-down {total - result.train_seconds:.2f} s")
    bare, script = statistics.median(bare_rates), statistics.median(script_rates)
    print(f"\nmedian over {args.rounds} rounds of {args.steps} steps: bare PyTorch loop {bare:.1f} img/s, "
          f"train_dit {script:.1f} img/s, ratio train_dit / bare = {script / bare:.3f} (goal >= 0.9); "
          f"one-off set-up per train_dit call {statistics.median(overheads):.2f} s")


if __name__ == "__main__":
    main()
