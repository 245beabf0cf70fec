"""What every part of lgm_ray shares and nothing else: the error kinds and exit codes, files written
whole or not at all, "did you mean", the command wrapper. Imports nothing of the rest of lgm_ray."""
