"""The `endpoints` fixture (HttpEndpoints on a live hub) for every transport test module."""

from tests.transports.test_http import endpoints

__all__ = ["endpoints"]
