"""Python gRPC client tests (a package, so this conftest does not shadow tools/tests/conftest.py)."""
