"""The ``tunix`` marker: tests that need google-tunix (and qwix, which it brings).

They run where tunix is installed (pinned google-tunix==0.1.7, which installs beside
jax 0.10.2 / flax 0.12.8 on Python 3.11 and beside jax 0.12.0.1 / flax 0.12.12 on
Python 3.12); ``-m 'not tunix'`` leaves them out elsewhere. They import tunix inside
the test, so a missing tunix is a skip, which the newest environment counts as a failure.
"""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "tunix: needs google-tunix (and qwix); run where it is installed")
