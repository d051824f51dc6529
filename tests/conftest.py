"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest
import torch

# Fake checkouts of other codebases, laid out as theirs (three ``causal_model.py``): imported by
# benchmarks/their_models_gpu.py in its test, never collected (doctest modules) here.
collect_ignore = ["fake_codebase"]


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every ``torch.empty``-style allocation is filled with NaN (or junk integers)."""

    def fill(buffer: torch.Tensor) -> torch.Tensor:
        if buffer.numel():
            with torch.no_grad():  # inductor's own probes allocate leaves that require grad
                buffer.fill_(float("nan") if buffer.is_floating_point() else junk(buffer.dtype))
        return buffer

    def junk(dtype: torch.dtype) -> int | bool:
        """A far-off integer the dtype holds (bool: True)."""
        return True if dtype == torch.bool else max(torch.iinfo(dtype).min, -123456789)

    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}
    for name, original in originals.items():
        monkeypatch.setattr(torch, name, lambda *a, _f=original, **kw: fill(_f(*a, **kw)))
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: fill(new_empty(self, *a, **kw)))
    # Compiled functions run eagerly under this fixture, so that their allocations are poisoned
    # too and no graph is traced through a patched torch.empty (CUDA inductor, torch 2.11,
    # rejected the traced fill even behind torch.compiler.disable and is_compiling()).
    with torch._dynamo.config.patch(disable=True):
        yield
