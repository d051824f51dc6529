"""Named presets: the Wan2.1 setups and the authors' gated models."""

from __future__ import annotations

import pytest

from omnimem import GatedConfig, OmniMemConfig
from omnimem.config import GATED_PRESETS, PRESETS


@pytest.mark.parametrize("name", list(PRESETS))
def test_wan_presets_keep_a_sink_frame_and_a_local_chunk(name):
    config = OmniMemConfig.preset(name)
    assert config.sink_tokens == 1560 and config.local_tokens == 3 * 1560 and config.block_size == 128
    assert OmniMemConfig.preset(name, top_k=8).top_k == 8


@pytest.mark.parametrize("name", list(GATED_PRESETS))
def test_gated_presets_are_the_released_models(name):
    config = GatedConfig.preset(name)
    assert (config.block_size, config.query_group_size, config.window_tokens) == (30, 15, 14040)
    assert config.top_k == (12 if name.endswith("long") else 16)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'wan2\.2'; expected one of"):
        OmniMemConfig.preset("wan2.2")
    with pytest.raises(ValueError, match="unknown preset"):
        GatedConfig.preset("wan2.1-1.3b")
    with pytest.raises(TypeError, match="unknown OmniMemConfig field"):
        OmniMemConfig.preset("wan2.1-1.3b", topk=3)


def test_from_frames_converts_self_forcing_units():
    config = OmniMemConfig.from_frames(1560, sink_frames=1, local_frames=3, exclusion_frames=6, top_k=16)
    assert (config.sink_tokens, config.local_tokens, config.exclusion_tokens, config.top_k) == (
        1560, 4680, 9360, 16,
    )  # fmt: skip
    assert OmniMemConfig.from_frames(12).exclusion_tokens is None
    with pytest.raises(ValueError, match="frame_tokens must be >= 1"):
        OmniMemConfig.from_frames(0)
    with pytest.raises(TypeError, match="local_frames must be an int"):
        OmniMemConfig.from_frames(12, local_frames=1.5)
