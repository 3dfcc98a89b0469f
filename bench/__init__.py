"""Sovereign's benchmark suite: the floor pass-through, target profiles, load clients and the runner.

Run it with ``python -m bench.run`` (or ``make bench``); see bench/README.md.
"""
