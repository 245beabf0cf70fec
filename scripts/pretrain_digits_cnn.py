"""Pre-train the shipped ``DigitsCNN`` backbone with SimCLR on the digits train split (no labels).

    OMP_NUM_THREADS=1 python scripts/pretrain_digits_cnn.py --seed 0

The loop, augmentation and probe are shared with the other demo backbones (``scripts/simclr_digits.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from simclr_digits import main as simclr_main

from lgm_ray.backbones.digits_cnn import DIGITS_CNN_WEIGHTS, DigitsCNN


def main(argv: Sequence[str] | None = None) -> float:
    """Pre-train, save ``lgm_ray/weights/digits_simclr_cnn.pt`` (or ``--out``), return the probe's test top-1."""
    return simclr_main(argv, DigitsCNN, description=__doc__.split("\n\n")[0], out=DIGITS_CNN_WEIGHTS, epochs=80,
                       lr=2e-3, batch_size=256, temperature=0.05, weight_decay=1e-4, warmup_epochs=1, clip=0.0,
                       max_scale=2.0)


if __name__ == "__main__":
    main()
