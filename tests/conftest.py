"""Shared fixtures.  Fast unit tests need nothing; `integration` tests start real
processes on loopback (ended by PID in fixtures); `soak` tests are long fault
runs, deselected by default and run by `pytest -m soak` in CI's second stage."""
