"""Muster's benchmark harness: every figure is a ratio against a reference measured in the
same run, because this machine is shared and absolute numbers mean little.

``python -m bench [scenario ...] [--quick] [--runs N]``; see ``docs/benchmarks.md``.
"""
