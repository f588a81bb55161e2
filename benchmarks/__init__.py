"""Speed and memory on the reference workload (``python -m benchmarks.<name>``); see README.md."""
