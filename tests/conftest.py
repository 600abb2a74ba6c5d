"""Shared fixtures. Each store's servers live in tests/fixtures/<store>.py."""

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.milvus",
    "tests.fixtures.ledger",
    "tests.fixtures.proxy",
    "tests.fixtures.demo",
]
