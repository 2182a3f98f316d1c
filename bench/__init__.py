"""Benchmarks of dcy against real Consul agents; run each as ``python bench/<name>.py``."""
