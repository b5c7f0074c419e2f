"""`python -m experiments` as a 2-process JAX job on this machine (CPU, 2 host devices per process,
JAX's CPU collectives): the same cells as a single-process run, and a job restarted after one of
its processes was killed computes only the missing cells."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

from experiments import config as C
from experiments import runner, sweep
from experiments.results import ResultStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two groups (batch sizes 4 and 8 compile separately), two grid points each. Process 0 writes the
# first group's two cells one after the other; the second group then needs a compilation and
# collectives with process 1, so killing process 1 as soon as the first group's cells are there
# leaves exactly the second group missing.
def _config(head: str, algorithms: str) -> str:
    """An experiment config on the 2 x 3 quadratic with 16 samples: `head`'s settings, the shared
    ones, then the `algorithms` tables."""
    return textwrap.dedent(head) + textwrap.dedent("""\
        metrics = ["grad_sq", "lower_gap"]
        timing = false
        progress = false
        compile_cache = false
    """) + textwrap.dedent("""
        [problem]
        name = "quadratic"
        dim_upper = 2
        dim_lower = 3
        n_samples = 16

        [plot]
        x = ["step"]
    """) + textwrap.dedent(algorithms)


CONFIG = _config("""
    name = "dist"
    seeds = 3
    steps = 20
    eval_every = 10
""", """
    [algorithms.soba]
    upper_lr = [0.05, 0.1]
    lower_lr = 0.2
    batch_size = 4

    [algorithms.soba8]
    preset = "soba"
    upper_lr = [0.05, 0.1]
    lower_lr = 0.2
    batch_size = 8
""")


def _job(config: str, results: str, logs: str, tag: str):
    """`python -m experiments config results_dir=results` as a job of 2 processes (2 CPU devices each)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "experiments", config, f"results_dir={results}",
               f"--coordinator-address=127.0.0.1:{port}", "--num-processes=2", f"--process-id={i}"]
        with open(os.path.join(logs, f"{tag}-{i}.log"), "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def test_two_processes_equal_one_and_a_restart_computes_only_the_missing_cells(tmp_path):
    config = str(tmp_path / "dist.toml")
    with open(config, "w") as f:
        f.write(CONFIG)
    logs = str(tmp_path)
    cfg = C.load(config, [f"results_dir={tmp_path / 'job'}"])
    cells = sweep.expand(cfg)
    assert len(cells) == 4
    store = ResultStore(C.experiment_dir(cfg))
    first = [c.cell_id for c in cells if c.label == "soba"]
    log0 = os.path.join(logs, "first-0.log")
    job = _job(config, str(tmp_path / "job"), logs, "first")
    try:
        start = time.monotonic()
        while not all(store.has(c) for c in first):                     # the first group is written
            assert all(p.poll() is None for p in job), open(log0).read()[-3000:]
            assert time.monotonic() - start < 180, "the first group was not written"
            time.sleep(0.01)
        job[1].send_signal(signal.SIGKILL)             # one process dies mid-run:
        while "JaxRuntimeError" not in open(log0).read():    # the other one fails in its next collective
            assert time.monotonic() - start < 240, open(log0).read()[-3000:]
            time.sleep(0.05)
        # the job is torn down (process 0 would wait for the coordination service's heartbeat
        # timeout, 100 s, before exiting)
    finally:
        for p in job:
            p.kill()
            p.wait()
    finished = [c.cell_id for c in cells if store.has(c.cell_id)]
    missing = [c.cell_id for c in cells if not store.has(c.cell_id)]
    assert finished == first, (finished, missing)
    files = {c: os.path.join(store.cells_dir, c) for c in finished}
    mtimes = {c: (os.stat(p + ".npz").st_mtime_ns, os.stat(p + ".json").st_mtime_ns) for c, p in files.items()}

    job = _job(config, str(tmp_path / "job"), logs, "restart")
    try:
        # meanwhile, the single-process run here (1 CPU device; the same code without the report)
        single = C.load(config, [f"results_dir={tmp_path / 'single'}"])
        one = ResultStore(C.experiment_dir(single))
        setup, reference = runner.prepare(single, one)
        runner.run_cells(single, setup, reference, one, cells, log=lambda *a: None)
        for i, p in enumerate(job):
            assert p.wait(timeout=180) == 0, open(os.path.join(logs, f"restart-{i}.log")).read()[-3000:]
    finally:
        for p in job:
            p.kill()
    log0 = open(os.path.join(logs, "restart-0.log")).read()
    assert f"{len(finished)} finished cell(s) found in {store.cells_dir}; {len(missing)} to compute." in log0
    assert "(process 1 of 2)" in open(os.path.join(logs, "restart-1.log")).read()
    assert all(store.has(c.cell_id) for c in cells)
    assert {c: (os.stat(p + ".npz").st_mtime_ns, os.stat(p + ".json").st_mtime_ns) for c, p in files.items()} == mtimes

    for cell in cells:
        a, b = one.load(cell.cell_id), store.load(cell.cell_id)
        assert a.meta["environment"]["processes"] == 1
        assert b.meta["environment"]["processes"] == 2 and b.meta["timings"]["n_devices"] == 4
        assert sorted(a.history) == sorted(b.history)
        for key in a.history:
            np.testing.assert_allclose(b.history[key], a.history[key], rtol=1e-12, atol=1e-14, err_msg=key)


def test_job_settings_errors(tmp_path, capsys, monkeypatch):
    """Bad or incomplete job settings: a one-line error and exit status 2, before any work."""
    from experiments.__main__ import main
    config = str(tmp_path / "dist.toml")
    with open(config, "w") as f:
        f.write(CONFIG)
    for flag, message in (("--num-processes=two", "argument --num-processes: invalid int value: 'two'"),
                          ("--bogus", "unrecognized arguments: --bogus")):
        assert main([config, flag]) == 2
        assert capsys.readouterr().err.startswith(f"error: {message} (usage: python -m experiments")
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    assert main([config]) == 2
    assert capsys.readouterr().err == "error: $JAX_PROCESS_ID must be an integer, got 'first'.\n"
    monkeypatch.delenv("JAX_PROCESS_ID")
    # a process id without a coordinator (JAX's own check; a fresh process: JAX must not have started)
    out = subprocess.run([sys.executable, "-m", "experiments", config, "--process-id=1", "--num-processes=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "JAX_COORDINATOR_ADDRESS"})
    assert out.returncode == 2
    assert out.stderr == "error: cannot join the multi-process job: coordinator_address should be defined.\n"


def test_a_missing_process_gives_a_startup_line_and_a_clear_error_after_the_timeout(tmp_path):
    """Process 0 alone (timeout from the config), process 1 alone with no coordinator listening
    (timeout from the environment): each prints who it waits for, then exits with status 2 and
    an error after the timeout (not JAX's abort after its 300 s default)."""
    config = str(tmp_path / "dist.toml")
    with open(config, "w") as f:
        f.write(CONFIG)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = [sys.executable, "-m", "experiments", config, f"results_dir={tmp_path}", "--num-processes=2"]
    alone = subprocess.Popen(base + ["init_timeout=2", f"--coordinator-address=127.0.0.1:{ports[0]}",
                                     "--process-id=0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    orphan = subprocess.Popen(base + [f"--coordinator-address=127.0.0.1:{ports[1]}", "--process-id=1"], cwd=ROOT,
                              env=dict(env, BILEVEL_INIT_TIMEOUT="2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    (out0, err0), (out1, err1) = alone.communicate(timeout=120), orphan.communicate(timeout=120)
    assert alone.returncode == 2 and orphan.returncode == 2
    assert out0.startswith(f"[job] process 0 of 2: coordinator 127.0.0.1:{ports[0]} (this process); "
                           "waiting for all 2 processes (ids 0..1); timeout 2 s")
    assert out1.startswith(f"[job] process 1 of 2: coordinator 127.0.0.1:{ports[1]} (process 0)")
    assert err0.startswith("error: the multi-process job did not start within 2 s: not all 2 processes connected "
                           f"to the coordinator at 127.0.0.1:{ports[0]} (this process).")
    assert err1.startswith("error: the multi-process job did not start within 2 s: process 1 got no answer from "
                           f"the coordinator at 127.0.0.1:{ports[1]} (process 0)")


def test_init_timeout_settings_are_checked(tmp_path, capsys):
    from experiments.__main__ import main
    config = str(tmp_path / "dist.toml")
    with open(config, "w") as f:
        f.write(CONFIG)
    assert main([config, "--init-timeout=soon"]) == 2
    assert "argument --init-timeout: invalid int value: 'soon'" in capsys.readouterr().err
    assert main([config, "init_timeout=0"]) == 2
    assert capsys.readouterr().err.endswith("init_timeout must be >= 1, got 0.\n")


DATA_PARALLEL = _config("""
    name = "dp"
    seeds = 2
    steps = 10
    eval_every = 5
    mesh = {data = 4}
""", """
    [algorithms.soba]
    upper_lr = 0.1
    lower_lr = 0.2
    batch_size = 8
    sampler = "shuffled"
""")


def test_one_run_data_parallel_over_two_processes_equals_shards_on_one_device(tmp_path):
    """`mesh = {data = 4}`: every run's samples split over the job's 4 devices (2 processes x 2), each
    device drawing 2 of the 8 samples of a step; the same histories (1e-12) as `shards = 4` on this
    process's one device, the sampling layout a mesh of 4 runs in shard_map (that a mesh of 4 devices
    in one process equals it is tests/test_data_parallel.py's check)."""
    config, sharded = str(tmp_path / "dp.toml"), str(tmp_path / "shards.toml")
    with open(config, "w") as f:
        f.write(DATA_PARALLEL)
    with open(sharded, "w") as f:
        f.write(DATA_PARALLEL.replace("mesh = {data = 4}\n", "").replace('sampler = "shuffled"',
                                                                        'sampler = "shuffled"\nshards = 4'))
    job = _job(config, str(tmp_path / "two"), str(tmp_path), "dp")
    try:
        cfg = C.load(sharded, [f"results_dir={tmp_path / 'one'}"])   # meanwhile, here on one device
        one = ResultStore(C.experiment_dir(cfg))
        setup, reference = runner.prepare(cfg, one)
        runner.run_cells(cfg, setup, reference, one, log=lambda *a: None)
        for i, p in enumerate(job):
            assert p.wait(timeout=300) == 0, open(os.path.join(str(tmp_path), f"dp-{i}.log")).read()[-3000:]
    finally:
        for p in job:
            p.kill()
    job_cfg = C.load(config, [f"results_dir={tmp_path / 'two'}"])
    (a,), (b,) = (ResultStore(C.experiment_dir(c)).load_many(cell.cell_id for cell in sweep.expand(c))
                  for c in (cfg, job_cfg))
    assert a.meta["environment"]["processes"] == 1 and b.meta["environment"]["processes"] == 2
    assert a.meta["timings"]["n_devices"] == 1 and b.meta["timings"]["n_devices"] == 4
    assert np.all(np.asarray(a.history["finite"]))
    assert sorted(a.history) == sorted(b.history)
    for key in a.history:
        np.testing.assert_allclose(b.history[key], a.history[key], rtol=1e-12, atol=1e-14, err_msg=key)
    assert np.max(np.abs(a.history["theta"][..., -1, :] - a.history["theta"][..., 0, :])) > 1e-3   # it moved


def test_mesh_config_errors(tmp_path):
    for table, message in (("mesh = {dat = 4}", "Did you mean 'data'?"), ("mesh = {data = 0}", "mesh.data must be")):
        config = str(tmp_path / "bad.toml")
        with open(config, "w") as f:
            f.write(DATA_PARALLEL.replace("mesh = {data = 4}", table))
        try:
            C.load(config, [])
        except C.ConfigError as e:
            assert message in str(e)
        else:
            raise AssertionError(f"{table} was accepted")
