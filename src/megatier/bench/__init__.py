"""Benchmarks: every figure is measured in one run next to the baseline it is compared with."""
