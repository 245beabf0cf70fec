"""The method itself, as tensors in and tensors out: the exact first-order LGM step (:mod:`.matching`;
docs/design.md §1–2) and its second-order reference (:mod:`.reference`), the synthetic set's
parameterisation and the one ``synset.pt`` loader (:mod:`.synset`), the augmentation (:mod:`.augment`),
the seeds every draw derives from (:mod:`.seeds`) and the paper's image sides (:mod:`.defaults`).

No files beyond ``synset.pt``, no Ray, no MLflow; imports only :mod:`lgm_ray.common`.
"""

from lgm_ray.core.augment import AugSpec
from lgm_ray.core.defaults import CROP_RES, REAL_RES, SYN_RES
from lgm_ray.core.matching import AMP_DTYPES, StepResult, lgm_step
from lgm_ray.core.seeds import derive_seed
from lgm_ray.core.synset import (
    SynsetFileError,
    SyntheticSet,
    load_synset_file,
    synset_payload,
    validate_synset,
)

__all__ = [
    "AMP_DTYPES", "CROP_RES", "REAL_RES", "SYN_RES", "AugSpec", "StepResult", "SynsetFileError", "SyntheticSet",
    "derive_seed", "lgm_step", "load_synset_file", "synset_payload", "validate_synset",
]
