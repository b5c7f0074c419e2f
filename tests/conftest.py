"""Shared test setup: float64 everywhere, small shared problems.

Compilation dominates the suite's time (about 80% of it: `-p compile_profile`), so XLA's CPU
backend is made cheaper for tests: backend optimisation turned down (the same programs, compiled
2-3x faster) and the fusion emitters off (another 40% of the CPU time of compile-bound tests:
57 s -> 33 s for test_custom_root + test_argmin), and one codegen thread per program (the
suite's 2 workers fill the 2 cores already; 10% less CPU). Numerics are unaffected at the tests' tolerances.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                           " --xla_cpu_use_fusion_emitters=false"
                           " --xla_cpu_parallel_codegen_split_count=1").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402

import bilevel_jax as bj  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (a fast test covers the same code)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def quad():
    """Deterministic strongly convex quadratic bilevel problem (d_theta=4, d_phi=6)."""
    return bj.problems.quadratic_bilevel(jax.random.PRNGKey(0), dim_upper=4, dim_lower=6)


@pytest.fixture(scope="session")
def quad_stoch():
    """Finite-sum version (64 samples per level, rank-one LL Hessians)."""
    return bj.problems.quadratic_bilevel(jax.random.PRNGKey(1), dim_upper=4, dim_lower=6, n_samples=64)


@pytest.fixture(scope="session")
def ridge():
    return bj.problems.ridge_hpo(jax.random.PRNGKey(2), per_feature=True)
