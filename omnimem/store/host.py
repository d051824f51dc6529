"""The host tier: page-locked host memory that device kernels read in place."""

from __future__ import annotations

import weakref

import torch


def host_zeros(shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
    """A zero host tensor; ``pin``: page-locked and mapped for device access (CUDA).

    Registered with ``cudaHostRegister`` rather than allocated with ``pin_memory=True``: torch's
    pinned allocator rounds every allocation up to a power of two, which can nearly double the
    host memory of a large history.
    """
    tensor = torch.zeros(shape, dtype=dtype)
    if pin and tensor.numel():
        cudart, pointer = torch.cuda.cudart(), tensor.data_ptr()
        flags = 3  # cudaHostRegisterPortable | cudaHostRegisterMapped: kernels read it in place
        error = cudart.cudaHostRegister(pointer, tensor.numel() * tensor.element_size(), flags)
        if int(error) != 0:
            raise RuntimeError(f"cudaHostRegister of the offloaded history failed (CUDA error {int(error)})")
        weakref.finalize(tensor, cudart.cudaHostUnregister, pointer)
    return tensor
