"""Attention backends (installed as ``omnimem.backends``).

Every backend module exposes one function with the same signature::

    forward(q, k, v, selection, *, chunk_len, scale, return_lse, config) -> (out, lse | None)

where ``selection`` is an [`omnimem.Selection`][omnimem.Selection]. A backend knows the block
table and the config, never another backend, the cache or the public API.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from omnimem.config import OmniMemConfig
from omnimem.selection import Selection


class BackendForward(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        selection: Selection,
        *,
        chunk_len: int,
        scale: float,
        return_lse: bool,
        config: OmniMemConfig,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


BACKEND_MODULES = {
    "dense": "omnimem.backends.dense",
    "flex": "omnimem.backends.flex",
    "triton": "omnimem.backends.triton",
    "gather": "omnimem.backends.gather",
}


def get_backend(name: str) -> BackendForward:
    """The ``forward`` function of backend ``name`` (imported on first use)."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {tuple(BACKEND_MODULES)}")
    return importlib.import_module(BACKEND_MODULES[name]).forward
