"""Seeds derived from named parts, the same on every process, device and machine.

Every random draw of a run (initial noise of class c at pyramid level l, the head and the
augmentation of step t, the real batch of step t) takes its generator from ``derive_seed(run seed,
tag, …)``. A draw then depends only on what it is for, never on how the work was split, which
worker made it, or when the run was resumed.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, step, tag, …), identical on every process and machine."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))
