"""Rolling Forcing's fake checkout: Self-Forcing's fake model over the Rolling Forcing stand-in
blocks (``updating_cache``; ``block_length`` set by the script to three frames)."""

from __future__ import annotations

from tests.causal_wan_standin import StandinRollingBlock
from tests.fake_codebase import fake_model


class CausalWanModel(fake_model.CausalWanModel):
    @staticmethod
    def block(dim, num_heads):
        return StandinRollingBlock(dim, num_heads, block_length=12)
