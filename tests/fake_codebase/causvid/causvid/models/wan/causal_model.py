"""CausVid's fake checkout: Self-Forcing's fake model over the CausVid stand-in blocks (whose
attention is dense up to ``current_end``; they compute it from ``current_start``)."""

from __future__ import annotations

from tests.causal_wan_standin import StandinCausVidBlock
from tests.fake_codebase import fake_model


class CausalWanModel(fake_model.CausalWanModel):
    @staticmethod
    def block(dim, num_heads):
        return StandinCausVidBlock(dim, num_heads)

    def forward(self, *args, current_end=None, **kwargs):  # their blocks get it positionally
        return super().forward(*args, **kwargs)
