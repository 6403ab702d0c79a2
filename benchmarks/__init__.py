"""Benchmark suite: ours vs the real alternatives, for the fused LM-head op and the full WPO loss step.

Run ``python -m benchmarks.run --device cpu|cuda [--quick]``; see ``benchmarks/README.md``.
"""
