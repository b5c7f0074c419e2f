"""Benchmarks of bilevel_jax (`make bench`, or `python -m benchmarks --help`).

One module per measurement (steps, oracle_efficiency, compile_cache, reference, vmap_scaling,
unrolled, peer), the problems in `setups`, the timing utility in `timing`, the markdown in
`report`. Results: results/bench/bench.json and bench.md.
"""
