"""Triton kernels used by the core (selection), one kernel and its launcher per file.

Imported lazily: triton is needed only on GPUs (and for tests under ``TRITON_INTERPRET=1``).
"""
