"""Benchmarks for ventilator and the naive pyzmq baseline it is compared against."""
