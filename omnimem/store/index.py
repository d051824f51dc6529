"""The selection index in int8: per-block key sums at a quarter of their float32 bytes.

Selection reads one sum per (batch, KV head, block, channel). At an hour of Wan2.1-1.3B video
(22.5M tokens a layer, 128-token blocks) those are 1.08 GB a layer in float32, 32 GB for 30
layers: more than the GPU should spend on an index. ``Int8BlockSums`` keeps each block's sum row
as int8 codes with one float32 step per (batch, head, block) (symmetric absmax: ``step =
max|sum| / 127``), 0.26x the bytes (7.77 GiB for the hour's 30 layers).

The bound (docs/positions.md, "An index that stays small"): a code is its sum rounded to the
step, so each channel is off by at most ``step / 2`` and a block's score ``scale * <p, sum> /
tokens`` (``p``: the pooled query summed over the KV head's query heads) by at most
``scale * ||p||_1 * step / (2 * tokens)``. Where, in a row, the lowest selected block's score
minus its bound still exceeds every unselected block's score plus its bound, the selection is
exactly the float32 index's (``tests/test_index.py`` checks both statements against float64).
"""

from __future__ import annotations

import torch

INDEX_FORMATS: tuple[str, ...] = ("float32", "int8")


def check_index_format(index_format: object, owner: str = "index_format") -> None:
    if not isinstance(index_format, str) or index_format not in INDEX_FORMATS:
        raise ValueError(f"{owner} must be one of {INDEX_FORMATS}, got {index_format!r}")


def quantize_sums(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [..., D], step float32 [...])`` of float32 sums ``[..., D]``: each row to its
    own absmax / 127 (a zero row: step 0, codes 0)."""
    sums = sums.float()
    step = sums.abs().amax(-1) / 127
    safe = torch.where(step > 0, step, 1.0)
    codes = torch.round(sums / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes, step


class Int8BlockSums:
    """Per-block key sums ``[B, H, NB, D]`` as int8 ``codes`` and a float32 ``step [B, H, NB]``.

    Written like the float32 tensor it replaces (``index[:, :, first:last] = sums`` quantizes
    each row once); selection reads the codes in its kernel and multiplies each block's score by
    its step (``omnimem.kernels.block_tables``), other paths dequantize.

    Example:
        >>> import torch
        >>> index = Int8BlockSums.zeros(1, 2, 4, 8)
        >>> index[:, :, 0:2] = torch.randn(1, 2, 2, 8)
        >>> index.dequantize().shape, index.nbytes
        (torch.Size([1, 2, 4, 8]), 96)
    """

    def __init__(self, codes: torch.Tensor, step: torch.Tensor) -> None:
        if codes.dtype != torch.int8 or step.dtype != torch.float32 or codes.shape[:-1] != step.shape:
            raise ValueError(
                f"Int8BlockSums takes int8 codes [B, H, NB, D] and float32 steps [B, H, NB], got "
                f"{codes.dtype} {tuple(codes.shape)} and {step.dtype} {tuple(step.shape)}"
            )
        self.codes, self.step = codes, step

    @classmethod
    def zeros(
        cls, batch: int, heads: int, blocks: int, head_dim: int, device: torch.device | str = "cpu"
    ) -> Int8BlockSums:
        return cls(
            torch.zeros(batch, heads, blocks, head_dim, dtype=torch.int8, device=device),
            torch.zeros(batch, heads, blocks, dtype=torch.float32, device=device),
        )

    def __repr__(self) -> str:
        b, h, nb, d = self.codes.shape
        return f"Int8BlockSums(B={b}, H={h}, blocks={nb}, D={d}, device={self.codes.device})"

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.step.numel()

    def __getitem__(self, index) -> Int8BlockSums:
        """A view over ``index`` of the leading ``[B, H, NB]`` dims (e.g. ``[:, heads]``)."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3 or any(i is Ellipsis for i in index):
            raise IndexError("Int8BlockSums indexes its [B, H, NB] dims only")
        return Int8BlockSums(self.codes[index], self.step[index])

    def __setitem__(self, index, sums: torch.Tensor) -> None:
        codes, step = quantize_sums(sums)
        index = index if isinstance(index, tuple) else (index,)
        self.codes[index] = codes
        self.step[index] = step

    def zero_(self) -> Int8BlockSums:
        self.codes.zero_()
        self.step.zero_()
        return self

    def to(self, device: torch.device | str) -> Int8BlockSums:
        return Int8BlockSums(self.codes.to(device), self.step.to(device))

    def dequantize(self) -> torch.Tensor:
        """The float32 sums the codes stand for, ``codes * step``: what non-kernel paths score."""
        return self.codes.float() * self.step[..., None]
