"""Re-create the shipped `digits` feature network: diffdistill/assets/digits_classifier.safetensors (+ .json).

Trains the small CNN preset for 8x8 grey images on scikit-learn's digits (1,797 images) with a seeded 20%
held-out split, prints the held-out accuracy and writes the weights (about 100 kB), the accuracy in the JSON.

    python scripts/make_digits_classifier.py [--out PATH] [--epochs 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import numpy as np
import torch

from diffdistill.metrics.features import (
    DIGITS_CLASSIFIER,
    ClassifierTraining,
    preset_for,
    save_classifier,
    to_uint8,
    train_classifier,
)


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as the `digits` data set yields them ([-1, 1], grey levels 0..16 -> g/8 - 1), as uint8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 8 - 1)[:, None]
    return to_uint8(x), torch.from_numpy(digits.target.astype(np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DIGITS_CLASSIFIER), help="weights file (.safetensors)")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, init and batches")
    args = parser.parse_args()

    torch.set_num_threads(1)
    images, labels = digits_images()
    training = ClassifierTraining(epochs=args.epochs, batch_size=32, lr=3e-3, seed=args.seed, shift=1)
    config = preset_for(images.shape[1:], 10)
    start = time.time()
    net, result = train_classifier(images, labels, config, training)
    print(f"trained in {time.time() - start:.1f}s: held-out accuracy {result['holdout_accuracy']:.4f} "
          f"({result['n_holdout']} images), train accuracy {result['train_accuracy']:.4f}")
    meta = dict(data="digits (scikit-learn load_digits)", script="scripts/make_digits_classifier.py",
                training=asdict(training), **result)
    path = save_classifier(net, args.out, meta)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB) and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
