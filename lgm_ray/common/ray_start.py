"""The one way lgm_ray starts or joins Ray (the distill workers, the sweep, the cross-model tasks).

:func:`start_ray` joins the cluster at ``address`` (or ``RAY_ADDRESS``) when one is given, and
otherwise starts a new local Ray of this process's own (``address="local"``): it never attaches to a
Ray that happens to run on the machine, whatever that one's authentication mode.
"""

from __future__ import annotations

import os
from typing import Any


def start_ray(address: str | None = None, *, dashboard: bool = False, num_cpus: int | None = None,
              log_to_driver: bool = True, **kwargs: Any) -> bool:
    """Join ``address`` / ``RAY_ADDRESS``, or start a local Ray; True when this call started it (the caller
    then shuts it down), False when Ray was already initialised in this process."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, **kwargs)
    else:
        ray.init(address="local", include_dashboard=dashboard, num_cpus=num_cpus, log_to_driver=log_to_driver,
                 **kwargs)
    return True
