"""Benchmarks, run from a checkout: python -m benches.<name> --help"""
