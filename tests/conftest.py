from hypothesis import HealthCheck, settings

# Small example counts: the CI machine has 2 cores and the suite must stay well under 15 min.
settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")
