"""Faster Triton CPU interpreter for the tests: triton.language patched once per launch.

Triton's interpreter remaps ``triton.language`` to interpreted ops when a kernel launches, and
again (``inspect.getmembers`` over its modules) on every call of a nested ``@triton.jit``
helper, though the launch already did: ~45% of an interpreted ``GatedCache`` step, whose
kernels call helpers in loops. Inside a launch, a helper whose language modules the launch
patched now skips that pass. Nothing is patched differently: the launch's patches replace
every builtin, so the helper's pass would find none left to patch, and what it re-set it never
restored. With an interpreter that lacks these internals, nothing changes.
"""

from __future__ import annotations

import functools
import inspect


def patch_once_per_launch() -> bool:
    """Install the shortcut; ``True`` when it is in place."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or executor is None or getattr(patch_lang, "_once_per_launch", False):
        return False
    launches: list[dict] = []  # the launches in progress: their language modules, patched yet

    def languages(fn) -> frozenset[int]:
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))

    class _Nothing:
        def restore(self) -> None:
            pass

    @functools.wraps(patch_lang)
    def once(fn):
        if launches and launches[-1]["patched"] and languages(fn) <= launches[-1]["languages"]:
            return _Nothing()
        scope = patch_lang(fn)
        if launches and not launches[-1]["patched"]:
            launches[-1]["patched"] = True
        return scope

    once._once_per_launch = True
    launch = executor.__call__

    @functools.wraps(launch)
    def tracked(self, *args, **kwargs):
        launches.append({"languages": languages(self.fn), "patched": False})
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = once
    executor.__call__ = tracked
    return True
