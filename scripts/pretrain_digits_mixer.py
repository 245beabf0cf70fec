"""Pre-train the shipped ``DigitsMixer`` backbone with SimCLR on the digits train split (no labels).

    OMP_NUM_THREADS=1 python scripts/pretrain_digits_mixer.py --seed 0

The loop, augmentation and probe are shared with the other demo backbones (``scripts/simclr_digits.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from simclr_digits import main as simclr_main

from lgm_ray.backbones.digits_mixer import WEIGHTS, DigitsMixer


def main(argv: Sequence[str] | None = None) -> float:
    """Pre-train, save ``lgm_ray/weights/digits_simclr_mixer.pt`` (or ``--out``), return the probe's test top-1."""
    return simclr_main(argv, DigitsMixer, description=__doc__.split("\n\n")[0], out=WEIGHTS, epochs=80,
                       lr=1e-3, batch_size=128, temperature=0.1)


if __name__ == "__main__":
    main()
