from hypothesis import HealthCheck, settings

# Bounded, CPU-sane example counts; HYPOTHESIS_PROFILE=thorough for a long local run.
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=500)
settings.load_profile("ci")
