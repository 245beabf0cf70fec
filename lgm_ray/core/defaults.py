"""The paper's image sides, declared once: every config (distillation, evaluation) takes them from here.

Real images are resized to ``REAL_RES`` (short side); the backbone sees ``CROP_RES`` crops (random
resized crops while distilling and training a probe, centre crops when testing one); synthetic
images are rendered at ``SYN_RES``.
"""

REAL_RES = 256
CROP_RES = 224
SYN_RES = 256
