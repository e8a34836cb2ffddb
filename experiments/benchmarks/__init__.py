"""Benchmarks of jis against uniform training and the algorithm's floor.

``step_cost``, ``convergence`` and ``scoring_scale`` each print a table and
write JSON (default under ``runs/benchmarks/``); ``report`` turns the JSON
into ``docs/benchmarks.md``. Each has a ``--quick`` mode for smoke tests.
"""
