"""Backbones that ship with lgm_ray and need no download."""

from lgm_ray.models.digits_cnn import (
    DIGITS_CNN_MEAN,
    DIGITS_CNN_STD,
    DIGITS_CNN_WEIGHTS,
    DigitsCNN,
    load_digits_cnn,
)

__all__ = ["DIGITS_CNN_MEAN", "DIGITS_CNN_STD", "DIGITS_CNN_WEIGHTS", "DigitsCNN", "load_digits_cnn"]
