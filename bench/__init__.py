"""Benchmarks, kept apart from the tests: each module is a script (`python bench/<name>.py --help`)."""
