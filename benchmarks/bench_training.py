"""Images/s of the training step of ``train_dit`` (what ``memsep train`` runs) vs a bare PyTorch loop.

Same model (the default digits DiT), same batch, same data, same optimiser, gradient clipping and EMA; rounds
alternate between the two in ABBA order so that load from other processes hits both alike. Reported: median
images/s of each over the rounds, and their ratio (goal >= 0.9). ``train_dit`` is timed by its own step clock
(``TrainResult.train_seconds``: batch drawing, loss, backward, clipping, AdamW, EMA, logging and the progress
bar; not the one-off set-up, which is printed separately). The bare loop is what one would write by hand: index
a batch, draw noise and timesteps, forward, MSE, backward, clip, step, ``torch._foreach_lerp_`` EMA.

    python benchmarks/bench_training.py [--rounds 5 --steps 40 --batch 64 --threads 2]

Second mode, how fast a setting memorizes (the research behind the default in the README): train with
``train_dit`` and, every ``--eval_every`` steps, sample the EMA model with each sampler from the same noise and print
the memorization ratio (1/3 rule against the n training digits) with the training wall and CPU seconds so far:

    python benchmarks/bench_training.py memorization --n 32 --batch 32 --lr 2e-3 --steps 2000 --eval_every 250
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


def memorization_speed(argv):
    import json

    parser = argparse.ArgumentParser(description="How fast a training setting memorizes the embedded digits.")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--eval_every", type=int, default=500)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--cond", action="store_true", help="Class-conditional (labels cycle over the 10 digits).")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--samplers", default="ddim50,ddpm100", help="Comma list of ddpm<steps> / ddim<steps>.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler, DDPMScheduler

    from diffusers_memsep.data import load_training_data
    from diffusers_memsep.trainer import (
        TrainingConfig,
        build_pipeline,
        make_dit,
        make_noise_scheduler,
        sample_and_measure,
        train_dit,
    )

    torch.manual_seed(args.seed)
    data = load_training_data(max_train_samples=args.n, seed=args.seed, label_column="label" if args.cond else None)
    model = make_dit(num_classes=data.num_classes)
    scheduler = make_noise_scheduler()
    clock = {"wall": 0.0, "cpu": 0.0, "wall0": time.perf_counter(), "cpu0": time.process_time()}

    def evaluate(model_with_ema, step):
        clock["wall"] += time.perf_counter() - clock["wall0"]
        clock["cpu"] += time.process_time() - clock["cpu0"]
        row = {"step": step, "train_wall_s": round(clock["wall"], 1), "train_cpu_s": round(clock["cpu"], 1)}
        pipeline = build_pipeline(model_with_ema, scheduler, data)
        pipeline.set_progress_bar_config(disable=True)
        for sampler in args.samplers.split(","):
            kind, steps = sampler[:4], int(sampler[4:])
            chosen = (DDPMScheduler if kind == "ddpm" else DDIMScheduler).from_config(scheduler.config)
            report = sample_and_measure(pipeline, args.samples, steps, data.num_classes, seed=1234,
                                        scheduler=chosen)[1]
            row[sampler] = report.ratio
        print(json.dumps(row), flush=True)
        clock["wall0"], clock["cpu0"] = time.perf_counter(), time.process_time()

    config = TrainingConfig(max_train_steps=args.steps, train_batch_size=args.batch, learning_rate=args.lr,
                            lr_warmup_steps=args.warmup, ema_max_decay=args.ema, validation_steps=args.eval_every,
                            show_progress=False, seed=args.seed)
    print(f"n={args.n} ({data.source}), {'conditional' if args.cond else 'unconditional'}, lr {args.lr}, "
          f"batch {args.batch}, EMA max decay {args.ema}, {args.samples} samples per sampler, "
          f"{args.threads} thread(s)")
    train_dit(model, data, scheduler, config, validation_fn=evaluate)
    print(f"training images/s: {args.steps * args.batch / clock['wall']:.1f} wall, "
          f"{args.steps * args.batch / clock['cpu']:.1f} per CPU-second")


def main():
    import sys

    if sys.argv[1:2] == ["memorization"]:
        return memorization_speed(sys.argv[2:])
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
    from diffusers_memsep.trainer import TrainingConfig, make_dit, make_noise_scheduler, train_dit

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
        # ABBA order: a load change from other processes during a round does not favour one contender
        if round_index % 2 == 0:
            bare = bare_loop(model, data.images, scheduler, args.steps, args.batch, config.learning_rate, round_index)
        start = time.perf_counter()
        result = train_dit(model, data, scheduler, config)
        total = time.perf_counter() - start
        if round_index % 2 == 1:
            bare = bare_loop(model, data.images, scheduler, args.steps, args.batch, config.learning_rate, round_index)
        if round_index:
            bare_rates.append(bare)
            script_rates.append(result.images_per_second)
            overheads.append(total - result.train_seconds)
        print(f"round {round_index}{' (warm-up)' if not round_index else ''}: bare {bare:7.1f} img/s | "
              f"train_dit {result.images_per_second:7.1f} img/s | "
              f"train_dit set-up + tear-down {total - result.train_seconds:.2f} s")
    bare, script = statistics.median(bare_rates), statistics.median(script_rates)
    print(f"\nmedian over {args.rounds} rounds of {args.steps} steps: bare PyTorch loop {bare:.1f} img/s, "
          f"train_dit {script:.1f} img/s, ratio train_dit / bare = {script / bare:.3f} (goal >= 0.9); "
          f"one-off set-up per train_dit call {statistics.median(overheads):.2f} s")


if __name__ == "__main__":
    main()
