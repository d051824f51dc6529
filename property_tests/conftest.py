import os

from hypothesis import HealthCheck, settings

# Bounded, CPU-sane example counts. HYPOTHESIS_PROFILE=thorough for a long local run, =gpu for
# the device run (each GPU example pays kernel launches and the CPU-side reference).
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=500)
settings.register_profile("gpu", parent=settings.get_profile("ci"), max_examples=20)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
