"""The tiers a history lives in (device memory, page-locked host memory, a file on disk): the
up-front capacity checks and the allocation of a native history, shared by ``OmniMemCache`` and
``GatedCache``. Quantized histories are ``omnimem.store.blocks.QuantizedBlocks`` on the device or
the host tier."""

from __future__ import annotations

import os

import torch

from omnimem.store.disk import disk_zeros
from omnimem.store.host import host_zeros


def available_host_memory() -> int | None:
    """Bytes the host can still give (``MemAvailable``: free plus reclaimable), if known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX host: cannot tell
        return None


def check_host_memory(nbytes: int) -> None:
    """Refuse up front a host history larger than the host's available memory."""
    available = available_host_memory()
    if available is not None and nbytes > available:
        raise ValueError(
            f"an offloaded history of this capacity needs {nbytes / 2**30:.1f} GiB of host memory, "
            f"but only {available / 2**30:.1f} GiB are available: lower the capacity"
        )


def check_device_memory(nbytes: int, device: torch.device) -> None:
    """Refuse up front a resident history larger than the GPU's free memory (CPU: unchecked,
    the host's allocator answers for itself)."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > free:
        raise ValueError(
            f"a resident history of this capacity needs {nbytes / 2**30:.1f} GiB of GPU memory, but "
            f"only {free / 2**30:.1f} GiB are free on {device}: use offload=True (the history in "
            "host memory) or lower the capacity (omnimem.kv_cache_bytes sizes a model)"
        )


def native_history(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    *,
    offload: bool,
    disk: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero keys and values of ``shape`` in ``dtype`` on their tier: ``device`` memory, or with
    ``offload`` host memory (page-locked and mapped when ``device`` is a GPU: kernels read it
    in place), or a file in ``disk`` (``omnimem.store.disk``: the page cache is its host memory).
    Zeros, not empty: unwritten space is never read, but finite is the safe default."""
    if not offload:
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
    if disk is not None:
        return disk_zeros(shape, dtype, disk), disk_zeros(shape, dtype, disk)
    pin = device.type == "cuda"
    return host_zeros(shape, dtype, pin=pin), host_zeros(shape, dtype, pin=pin)
