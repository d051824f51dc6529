"""Self-Forcing's fake checkout: the fake model over Self-Forcing's stand-in blocks."""

from tests.fake_codebase.fake_model import CausalWanModel

__all__ = ["CausalWanModel"]
