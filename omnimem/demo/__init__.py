"""The built-in tiny causal video DiT and the ``omnimem demo`` rollout."""
