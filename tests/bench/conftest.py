"""Registers the ``bench`` marker so the harness's smoke tests can be deselected."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "bench: runs the benchmark harness end to end (deselect with -m 'not bench')"
    )
