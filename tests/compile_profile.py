"""Opt-in pytest plugin: where the suite's time goes (compilation vs running), per test.

    PYTHONPATH=tests .venv/bin/python -m pytest tests -n 2 -p compile_profile

appends one line per test to $COMPILE_PROFILE (default /tmp/compile_profile.tsv): the test id,
its wall seconds, the XLA backend-compile seconds, the number of compilations, the tracing +
lowering seconds (JAX's monitoring events), the CPU seconds of the test's process (the figure
that survives a loaded machine) and the CPU seconds of the subprocesses it waited for (the
multi-device tests), so `sort -t$'\\t' -k2 -gr` lists the tests to shrink.
"""
import os
import resource
import time

import jax.monitoring
import pytest

_EVENTS = {"/jax/core/compile/backend_compile_duration": "compile",
           "/jax/core/compile/jaxpr_trace_duration": "trace",
           "/jax/core/compile/jaxpr_to_mlir_module_duration": "trace"}
_totals = {"compile": 0.0, "trace": 0.0, "count": 0}


def _listen(name, seconds, **_):
    kind = _EVENTS.get(name)
    if kind is not None:
        _totals[kind] += seconds
        _totals["count"] += kind == "compile"


jax.monitoring.register_event_duration_secs_listener(_listen)


def _children():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before, start, cpu, sub = dict(_totals), time.perf_counter(), time.process_time(), _children()
    yield
    wall, cpu, sub = time.perf_counter() - start, time.process_time() - cpu, _children() - sub
    row = (item.nodeid, f"{wall:.2f}", f"{_totals['compile'] - before['compile']:.2f}",
           str(_totals["count"] - before["count"]), f"{_totals['trace'] - before['trace']:.2f}", f"{cpu:.2f}",
           f"{sub:.2f}")
    with open(os.environ.get("COMPILE_PROFILE", "/tmp/compile_profile.tsv"), "a") as f:
        f.write("\t".join(row) + "\n")
