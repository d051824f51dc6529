"""Programmatic dependent launch (Hopper and newer) for chains of short kernels.

A kernel launched with ``launch_pdl=True`` may start while the previous kernel of its stream
is still draining; it must call ``gdc_wait()`` before it reads anything that kernel (or any
earlier one) wrote. ``gdc_launch_dependents()`` in the earlier kernel lets the next one start
before the earlier one's last programs finish. Both are no-ops without such a launch, and the
kernels call them only under a ``constexpr`` flag, so Triton's CPU interpreter never sees them.
"""

from __future__ import annotations

import functools

import torch
import triton

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    PDL_SUPPORTED = True
except ImportError:  # an older Triton: the flags stay off and these are never traced
    PDL_SUPPORTED = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@functools.cache
def pdl_available(device: torch.device) -> bool:
    """Whether kernels on ``device`` can be launched with ``launch_pdl=True``."""
    return PDL_SUPPORTED and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


__all__ = ["PDL_SUPPORTED", "gdc_launch_dependents", "gdc_wait", "pdl_available"]
