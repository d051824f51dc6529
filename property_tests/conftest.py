import os

from hypothesis import HealthCheck, settings

# One knob scales every property test: a profile sets the default example count, and tests
# that need fewer or more than the default state theirs relative to the "ci" profile's 40
# through ``examples(n)``, so that "thorough" (500, 12.5x) raises every one of them.
# HYPOTHESIS_PROFILE=thorough for a long local campaign, =gpu for the device run (each GPU
# example pays kernel launches and the CPU-side reference).
CI_EXAMPLES = 40
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
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=500, derandomize=False)
settings.register_profile("gpu", parent=settings.get_profile("ci"), max_examples=20, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> int:
    """``n`` examples under the "ci" profile, scaled like the loaded profile's default."""
    return max(1, round(n * settings.default.max_examples / CI_EXAMPLES))
