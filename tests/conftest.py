"""Shared fixtures live in one plugin module per area, so parts of the suite stay independent."""

pytest_plugins = [
    "tests.fixtures_daemon",  # azaiond as a separate process on a temp socket
    "tests.fixtures_stack",  # reference Resource API + moto S3 on loopback
    "tests.fixtures_docker",  # a private dockerd on a temp socket
    "tests.fixtures_unlock",  # unlock harness: reference API with a key fragment, job, daemon
    "tests.fixtures_engine",  # the services wired in-process against the dev stack
]
