"""The disk tier: a history kept in a file-backed mapping, the operating system's page cache as
its host-memory cache.

The file is preallocated (``posix_fallocate``: a full disk is refused here, not discovered by a
``SIGBUS`` in the middle of a write) and unlinked as soon as it is mapped, so nothing is left on
disk when the tensor is freed or the process dies. Device kernels cannot read a file mapping in
place; ``omnimem.sparse.offload`` stages the blocks a call needs through a small page-locked bounce
buffer instead (one host synchronization per call: the host has to know which blocks to read).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import torch


def check_disk_space(nbytes: int, directory: str | os.PathLike, what: str = "the history") -> None:
    """A ``ValueError`` unless ``directory`` is a writable directory with ``nbytes`` free."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise ValueError(f"disk={directory!r} must be a writable directory")
    free = shutil.disk_usage(directory).free
    if nbytes > free:
        raise ValueError(
            f"{what}: {nbytes / 2**30:.2f} GiB needed on disk={directory!r}, which has {free / 2**30:.2f} "
            "GiB free: pass another directory or a smaller capacity"
        )


def disk_zeros(shape: tuple[int, ...], dtype: torch.dtype, directory: str | os.PathLike) -> torch.Tensor:
    """A zero CPU tensor backed by a preallocated, already unlinked file in ``directory``.

    Raises:
        ValueError: ``directory`` is not a writable directory, or lacks the space.
    """
    directory = os.fspath(directory)
    check_disk_space(0, directory)
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    handle, path = tempfile.mkstemp(prefix="omnimem-history-", suffix=".bin", dir=directory)
    try:
        try:
            if nbytes:
                os.posix_fallocate(handle, 0, nbytes)
        except OSError as err:
            free = shutil.disk_usage(directory).free
            raise ValueError(
                f"disk={directory!r} cannot hold the history: {nbytes / 2**30:.2f} GiB needed, "
                f"{free / 2**30:.2f} GiB free ({err.strerror}); pass another directory or a smaller capacity"
            ) from None
        tensor = torch.zeros(0, dtype=dtype)
        if numel:
            tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(handle)
        os.unlink(path)  # the mapping keeps the data; the name goes now
    return tensor.view(shape)


def read_blocks(
    stored: torch.Tensor, into: torch.Tensor, blocks: torch.Tensor, slots: torch.Tensor, rows: int
) -> None:
    """Copy block ``blocks[i]`` of ``(batch, head) = slots[i, :2]`` of ``stored [B, H, L, ...]``
    (a disk mapping; ``rows`` per block) into slot ``slots[i, 2]`` of ``into [B, H, W * rows,
    ...]`` (page-locked bounce rows), for the ``n`` listed blocks only (``blocks [n]``, ``slots
    [n, 3]``, CPU int64): the host reads what a call fetches, not the whole staging width."""
    if not blocks.numel():
        return
    offsets = torch.arange(rows)
    batch, head = slots[:, 0, None], slots[:, 1, None]
    read = stored[batch, head, blocks[:, None] * rows + offsets]  # [n, rows, ...]: only these pages
    into[batch, head, slots[:, 2, None] * rows + offsets] = read
