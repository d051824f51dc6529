"""One way to compile omnimem's hot functions: static shapes, a roomy recompile budget."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

# torch's default (8 compiled variants per function) is spent by a model with a few attention
# shapes plus a test suite; past it, dynamo runs the function eagerly, which for FlexAttention
# on a GPU means materialising the full [Lq, Lkv] score matrix.
RECOMPILE_LIMIT = 64


def compile_static(fn: Callable, *, fullgraph: bool = False) -> Callable:
    """``torch.compile(fn, dynamic=False)`` run under a recompile limit of ``RECOMPILE_LIMIT``.

    ``fullgraph=True`` makes exhausting the limit an error instead of a silent eager fallback.
    """
    compiled = torch.compile(fn, dynamic=False, fullgraph=fullgraph)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)

    return call
