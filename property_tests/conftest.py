import os

from hypothesis import HealthCheck, settings

# One knob scales every property test: a profile sets the default example count, and tests
# that need fewer or more than the default state theirs relative to a default of SCALE
# through ``examples(n)``, so that "thorough" (500, 12.5x SCALE) raises every one of them.
# HYPOTHESIS_PROFILE=thorough for a long local campaign, =gpu for the device run (each GPU
# example pays kernel launches and the CPU-side reference).
SCALE = 40
# CI's share: 25 of SCALE's 40 keeps the whole suite under CI's 20 minutes on its 2-core AVX2
# machine (the Triton interpreter dominates); the full 40 is HYPOTHESIS_PROFILE=full.
CI_EXAMPLES = 25
# "ci" draws the same examples on every run (derandomize): its time on a 2-core machine is
# budgeted, and a draw of the interpreter's costliest shapes must not decide a run. The other
# profiles explore afresh each run.
settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
    derandomize=True,
)
settings.register_profile("full", parent=settings.get_profile("ci"), max_examples=SCALE)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=500, derandomize=False)
settings.register_profile("gpu", parent=settings.get_profile("ci"), max_examples=20, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> int:
    """``n`` examples at a default of ``SCALE``, scaled like the loaded profile's default."""
    return max(1, round(n * settings.default.max_examples / SCALE))
