"""Faithful local fakes of the carriers and speech APIs, for tests, benchmarks and demos."""
