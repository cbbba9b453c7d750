"""Helper programs the tests run as separate processes (each file says who runs it and why)."""
