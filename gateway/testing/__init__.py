"""Test tooling shipped with medgate: the simulators, the pytest plugin and the demo."""
