"""lgm_ray: Linear Gradient Matching dataset distillation, run as Ray sweeps.

Cazenavette, Torralba, Sitzmann, *Dataset Distillation for Pre-Trained Self-Supervised Vision
Models*, NeurIPS 2025 (arXiv 2511.16674).
"""

__version__ = "0.1.0"
