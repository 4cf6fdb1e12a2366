"""Benchmarks and the data they load (a package so that tests can import the dataset)."""
