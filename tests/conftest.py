"""Hypothesis profiles: the default keeps each fuzz test to a few seconds in CI;
`python3 -m pytest tests/test_codec_fuzz.py --hypothesis-profile=long` runs 100,000 examples."""

from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=300, deadline=None)
settings.register_profile("long", max_examples=100_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")
