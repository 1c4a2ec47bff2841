"""Side-by-side benchmarks: each figure is a ratio measured in one run. Never part of the test suite."""
