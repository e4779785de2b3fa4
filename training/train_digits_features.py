#!/usr/bin/env python
"""Train the digits classifier whose features define the "Frechet distance in digits-classifier feature space".

    python training/train_digits_features.py            # writes diffusers_memsep/assets/digits_features.safetensors

First the recipe is trained on a seeded 80% split and scored on the other 20% (the honest accuracy, stored in the
weights' metadata); then the shipped model is trained with the same recipe on all 1,797 digits.
"""

import argparse
import os
import sys
import time

import torch

from diffusers_memsep.memorization.features import (
    accuracy,
    load_digits_dataset,
    save_digits_feature_extractor,
    train_digits_feature_extractor,
)

DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(__file__), "..", "diffusers_memsep", "assets", "digits_features.safetensors"
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout_fraction", type=float, default=0.2)
    parser.add_argument("--output", default=os.path.normpath(DEFAULT_OUTPUT))
    args = parser.parse_args(argv)
    if not 0 < args.holdout_fraction < 1:
        parser.error("--holdout_fraction must lie in (0, 1)")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    images, labels = load_digits_dataset()
    recipe = dict(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed)

    start = time.time()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    num_holdout = int(round(args.holdout_fraction * len(images)))
    holdout, train = order[:num_holdout], order[num_holdout:]
    model = train_digits_feature_extractor(images[train], labels[train], **recipe)
    holdout_accuracy = accuracy(model, images[holdout], labels[holdout])
    print(f"recipe check: trained on {len(train)}, held-out accuracy on {len(holdout)} = {holdout_accuracy:.4f}")

    model = train_digits_feature_extractor(images, labels, **recipe)
    train_accuracy = accuracy(model, images, labels)
    print(f"shipped model: trained on all {len(images)} digits, training accuracy = {train_accuracy:.4f}")
    save_digits_feature_extractor(
        model,
        args.output,
        {
            "feature_space": "digits-classifier feature space (64-d penultimate layer)",
            "data": "sklearn load_digits, all 1797 images, x / 16 * 2 - 1",
            "recipe": recipe,
            "holdout_accuracy": {"fraction": args.holdout_fraction, "accuracy": holdout_accuracy},
            "train_accuracy": train_accuracy,
            "script": "training/train_digits_features.py",
        },
    )
    print(f"wrote {args.output} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
