"""The experiment runner: config validation, overrides, resumable sweeps, sharding, figures."""
import json
import os

import numpy as np
import pytest

from experiments import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(results_dir, **top):
    """A tiny quadratic sweep: soba over a 3-point grid (one compiled call), 2 seeds, 20 steps."""
    raw = {
        "name": "tiny", "seeds": 2, "steps": 20, "eval_every": 10, "metrics": ["grad_sq", "lower_gap"],
        "timing": False, "progress": False, "results_dir": str(results_dir), "compile_cache": False,
        "problem": {"name": "quadratic", "dim_upper": 2, "dim_lower": 3, "n_samples": 16},
        "algorithms": {"soba": {"upper_lr": [0.05, 0.1, 0.2], "lower_lr": 0.2, "batch_size": 4}},
    }
    raw.update(top)
    return C.from_dict(raw, source="tiny")


# ---------------------------------------------------------------------------------------------
# config and overrides

@pytest.mark.parametrize("text, expected", [
    ("steps=200", (["steps"], 200)),
    ("full=true", (["full"], True)),
    ("algorithms.soba.upper_lr=0.1", (["algorithms", "soba", "upper_lr"], 0.1)),
    ("algorithms.soba.step=[0.125, 0.25]", (["algorithms", "soba", "step"], [0.125, 0.25])),
    ("problem.path=/data/ijcnn1", (["problem", "path"], "/data/ijcnn1")),
    ('title="a b"', (["title"], "a b")),
    ("only=soba,saba", (["only"], "soba,saba")),
])
def test_parse_override(text, expected):
    assert C.parse_override(text) == expected


def test_override_errors():
    with pytest.raises(C.ConfigError, match="key=value"):
        C.parse_override("steps")
    with pytest.raises(C.ConfigError, match="[Vv]alid keys: .*eval_every.*steps"):
        C.apply_overrides({}, ["stpes=3"])


def test_overrides_and_paper_precedence(tmp_path):
    raw = {"steps": 10, "eval_every": 5, "metrics": ["grad_sq"], "problem": {"name": "quadratic"},
           "algorithms": {"soba": {"upper_lr": 0.1}},
           "paper": {"steps": 100, "eval_every": 10, "problem.n_samples": 512, "algorithms.soba.upper_lr": 0.5}}
    cfg = C.from_dict(raw, ["algorithms.soba.upper_lr=[0.1, 0.2]", "seeds=4"])
    assert cfg["steps"] == 10 and cfg["seeds"] == 4 and cfg["algorithms"]["soba"]["upper_lr"] == [0.1, 0.2]
    full = C.from_dict(raw, ["full=true", "eval_every=20"])
    assert full["steps"] == 100 and full["eval_every"] == 20            # command line beats [paper]
    assert full["problem"]["n_samples"] == 512 and full["algorithms"]["soba"]["upper_lr"] == 0.5
    assert C.experiment_dir(full).endswith("-full")
    path = tmp_path / "c.toml"
    path.write_text('steps = 10\neval_every = 5\nmetrics = ["grad_sq"]\n[problem]\nname = "quadratic"\n'
                    '[algorithms.soba]\nupper_lr = 0.1\n')
    assert C.load(str(path), ["steps=20"])["steps"] == 20
    assert C.load(str(path))["name"] == "c"


def test_config_errors_list_valid_names(tmp_path):
    base = {"steps": 10, "eval_every": 5, "metrics": ["grad_sq"], "problem": {"name": "quadratic"},
            "algorithms": {"soba": {}}}
    with pytest.raises(C.ConfigError, match=r"unknown key 'stepz'.*Did you mean 'steps'\? Valid keys: .*eval_every.*steps"):
        C.from_dict(dict(base, stepz=3))
    with pytest.raises(C.ConfigError, match="multiple of eval_every"):
        C.from_dict(dict(base, steps=12))
    with pytest.raises(C.ConfigError, match=r"\[plot\].*[Vv]alid keys: .*metrics"):
        C.from_dict(dict(base, plot={"metricz": ["grad_sq"]}))
    with pytest.raises(C.ConfigError, match="valid axes: time, oracles, step"):
        C.from_dict(dict(base, plot={"x": ["walltime"]}))

    from experiments import runner, sweep
    cfg = C.from_dict(dict(base, problem={"name": "quadratc"}))
    with pytest.raises(C.ConfigError, match="unknown problem 'quadratc'; valid problems: .*logreg_hpo, quadratic"):
        runner.check(cfg)
    cfg = C.from_dict(dict(base, problem={"name": "quadratic", "dim": 3}))
    with pytest.raises(C.ConfigError, match="Valid keys: .*dim_lower.*dim_upper"):
        runner.check(cfg)
    cfg = C.from_dict(dict(base, metrics=["gradient"]))
    with pytest.raises(C.ConfigError, match="valid metrics: grad_sq"):
        runner.check(cfg)
    cfg = C.from_dict(dict(base, algorithms={"sobb": {}}))
    with pytest.raises(C.ConfigError, match="unknown algorithm 'sobb'; valid names: .*saba.*soba.*ttsa"):
        runner.check(cfg)
    cfg = C.from_dict(dict(base, algorithms={"soba": {"upper_step": 0.1}}))
    with pytest.raises(C.ConfigError, match="unknown key.*upper_step.*[Vv]alid keys: .*lower_lr.*upper_lr"):
        runner.check(cfg)
    cfg = C.from_dict(dict(base, algorithms={"amigo": {"linear_solver": {"name": "cgg"}}}))
    with pytest.raises(C.ConfigError, match="name one of cg, damped, dense, gd, .*normal, .*stochastic_neumann"):
        sweep.expand(cfg)
    cfg = C.from_dict(dict(base, algorithms={"amigo": {"linear_solver": {"name": "cg", "maxiters": 3}}}))
    with pytest.raises(C.ConfigError,
                       match=r"amigo.linear_solver: unknown key.*maxiters.*Did you mean .maxiter.\? Valid keys: .*maxiter, name"):
        runner.check(cfg)
    cfg = C.from_dict(dict(base, algorithms={"ttsa": {"lower_steps": 3, "static": ["upper_lr"]}}))
    with pytest.raises(C.ConfigError, match=r"unknown key\(s\) \['lower_steps', 'static'\] for 'ttsa'\..* Valid keys: "
                                            r".*neumann_steps.*upper_lr"):
        runner.check(cfg)                           # ttsa sets lower_steps itself; `static` is gone
    cfg = C.from_dict(dict(base, algorithms={"soba": {"upper_lr": [0.1, -0.2]}}))
    with pytest.raises(C.ConfigError, match=r"algorithms.soba at \{'upper_lr': -0.2\}: .*positive step size"):
        runner.check(cfg)                           # every grid point is built before any work
    with pytest.raises(C.ConfigError, match="only= names unknown"):
        C.from_dict(dict(base, only="saba"))


def test_cli_reports_config_errors(tmp_path, capsys):
    """`python -m experiments`'s entry point (run as a module in tests/test_distributed.py): exit status 2."""
    from experiments.__main__ import main
    path = tmp_path / "bad.toml"
    path.write_text('steps = 10\neval_every = 5\nmetrics = ["grad_sq"]\n[problem]\nname = "quadratic"\n'
                    '[algorithms.sobaa]\n')
    assert main([str(path), f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "unknown algorithm 'sobaa'; valid names:" in err and "soba" in err


def test_a_batch_size_larger_than_the_data_is_a_one_line_error(tmp_path, capsys):
    from experiments.__main__ import main
    path = tmp_path / "big.toml"
    path.write_text('steps = 10\neval_every = 5\nmetrics = ["grad_sq"]\ntiming = false\nprogress = false\n'
                    'compile_cache = false\n[problem]\nname = "quadratic"\ndim_upper = 2\ndim_lower = 3\n'
                    'n_samples = 16\n[algorithms.soba]\nbatch_size = 32\n')
    assert main([str(path), f"results_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == "error: algorithms.soba: batch_size=32 is larger than upper data's 16 samples.\n"


def test_grid_expansion_and_groups(tmp_path):
    import bilevel_jax as bj
    from experiments import problems, sweep
    cfg = tiny(tmp_path, algorithms={
        "soba": {"upper_lr": [0.1, 0.2], "lower_lr": 0.2, "batch_size": 4},
        "aid_cg": {"preset": "aid_bio", "upper_lr": 0.1, "linear_solver": {"name": "cg", "maxiter": [1, 3]}},
        "saba": {"step": 0.1, "ratio": [1.0, 0.1], "batch_size": 4, "steps": 40}})
    cells = sweep.expand(cfg)
    assert [c.label for c in cells] == ["soba", "soba", "aid_cg", "aid_cg", "saba", "saba"]
    assert cells[0].spec == {"upper_lr": 0.1, "lower_lr": 0.2, "batch_size": 4}
    assert cells[0].point == {"upper_lr": 0.1}
    assert cells[2].spec["linear_solver"] == {"name": "cg", "maxiter": 1}
    assert cells[4].spec == {"step": 0.1, "ratio": 1.0, "batch_size": 4, "steps": 40}
    problem = problems.build(cfg["problem"]).instance.problem
    groups = sweep.groups(cells, problem, cfg)
    assert [len(g) for g in groups] == [2, 1, 1, 2]           # a static grid axis (CG's maxiter) splits
    assert len({c.cell_id for c in cells}) == 6
    assert [c.cell_id for c in sweep.expand(cfg)] == [c.cell_id for c in cells]   # ids: from the config only
    assert sweep.run_length(cells[4], cfg) == (40, 10)
    # the traced part is exactly the built algorithm's array fields (here with step/ratio applied)
    saba = sweep.split(cells[5], problem, cfg)
    traced = sweep.traced_values(saba.dyn)
    assert traced["upper.learning_rate"] == pytest.approx(1.0) and traced["lower.learning_rate"] == 0.1
    # a float hyperparameter written as an int (TOML `1`) is traced as a float: one group
    ints = sweep.expand(tiny(tmp_path, algorithms={"soba": {"upper_lr": [1, 0.5], "lower_lr": 1}}))
    assert [len(g) for g in sweep.groups(ints, problem, cfg)] == [2]
    # a damped solver's table nests its solver's; the damping is an array field: one group of two
    damped = sweep.expand(tiny(tmp_path, algorithms={"aid_bio": {"upper_lr": 0.1, "linear_solver": {
        "name": "damped", "damping": [0.0, 0.5], "solver": {"name": "cg", "maxiter": 3}}}}))
    assert [len(g) for g in sweep.groups(damped, problem, cfg)] == [2]
    assert isinstance(sweep.split(damped[1], problem, cfg).static.direction.solver, bj.linear_solvers.Damped)


def test_groups_are_static_parts_and_sweep_equals_single_runs(tmp_path):
    """Grid points differing only in a float share one compiled function, an int (lower_steps,
    batch_size) splits the group (across labels too: equal static parts merge), and the vmapped
    sweep reproduces separate single runs of every cell."""
    import jax
    import bilevel_jax as bj
    from experiments import problems, sweep
    cfg = tiny(tmp_path, algorithms={
        "soba": {"upper_lr": [0.05, 0.2], "lower_lr": 0.2, "batch_size": 4},
        "aid": {"preset": "aid_bio", "upper_lr": 0.1, "lower_lr": 0.2, "lower_steps": [1, 2], "batch_size": "full"},
        "soba_b": {"preset": "soba", "upper_lr": 0.1, "lower_lr": 0.2, "batch_size": [4, 8]}})
    cells = sweep.expand(cfg)
    workload = problems.build(cfg["problem"])
    inst = workload.instance
    groups = sweep.groups(cells, inst.problem, cfg)
    ids = lambda g: [c.cell_id for c in g]   # noqa: E731
    assert [ids(g) for g in groups] == [ids([cells[0], cells[1], cells[4]]), ids([cells[2]]), ids([cells[3]]),
                                        ids([cells[5]])]

    runner = sweep.BatchedRunner(workload, cfg, sweep.make_mesh())
    seeds = [0, 3]
    soba = groups[0][:2]
    hist, timings = runner.run(soba, seeds)
    assert runner.num_compiled == 1 and timings.compile_s > 0
    _, again = runner.run(soba, seeds)                  # same group and batch size: reused
    assert runner.num_compiled == 1 and again.compile_s == 0.0
    with pytest.raises(ValueError, match="static parts"):
        runner.run([cells[2], cells[3]], seeds)

    for group in groups[1:3]:
        h, _ = runner.run(group, seeds)
        hist = {k: np.concatenate([hist[k], h[k]]) for k in hist}
    assert runner.num_compiled == 3
    presets = {"soba": bj.algorithms.soba, "aid": bj.algorithms.aid_bio}
    for i, cell in enumerate(soba + groups[1] + groups[2]):
        kwargs = dict(cell.spec, batch_size=None if cell.spec["batch_size"] == "full" else cell.spec["batch_size"])
        alg = presets[cell.label](inst.problem, **kwargs)
        for j, seed in enumerate(seeds):
            state = alg.init(inst.theta0, inst.phi0, jax.random.PRNGKey(seed), inst.data)
            _, single = bj.run(alg, state, inst.data, num_steps=cfg["steps"], eval_every=cfg["eval_every"],
                               eval_fn=sweep.record_iterates)
            for key in ("theta", "phi", "lower_grads", "upper_grads", "hvps", "cross", "finite"):
                np.testing.assert_allclose(hist[key][i, j], np.asarray(single[key]), rtol=1e-12, atol=1e-14,
                                           err_msg=f"{cell.cell_id} seed {seed}: {key}")
            assert np.all(np.isfinite(hist["theta"][i, j])) and np.all(np.abs(hist["theta"][i, j]) < 1e3)


# ---------------------------------------------------------------------------------------------
# resumable sweeps

class Killed(Exception):
    pass


def test_resume_after_kill_computes_only_missing_cells(tmp_path):
    from experiments import runner, sweep
    from experiments.results import ResultStore
    cfg = tiny(tmp_path, chunk=1)                       # one compiled call per cell (same executable)
    store = ResultStore(C.experiment_dir(cfg))
    workload, reference = runner.prepare(cfg, store)
    cells = sweep.expand(cfg)
    assert len(cells) == 3

    def kill_after_first(cell):
        raise Killed(cell.cell_id)

    with pytest.raises(Killed):
        runner.run_cells(cfg, workload, reference, store, cells, on_cell_saved=kill_after_first, log=lambda *a: None)
    done = [c.cell_id for c in cells if store.has(c.cell_id)]
    assert done == [cells[0].cell_id]
    first = os.path.join(store.cells_dir, done[0])
    mtimes = (os.stat(first + ".npz").st_mtime_ns, os.stat(first + ".json").st_mtime_ns)
    assert not [f for f in os.listdir(store.cells_dir) if f.startswith(".tmp")]   # no partial files

    stats = runner.run_cells(cfg, workload, reference, store, cells, log=lambda *a: None)
    assert stats.computed == [c.cell_id for c in cells[1:]] and stats.skipped == [cells[0].cell_id]
    assert (os.stat(first + ".npz").st_mtime_ns, os.stat(first + ".json").st_mtime_ns) == mtimes

    os.remove(os.path.join(store.cells_dir, cells[1].cell_id + ".json"))      # a lost cell
    stats = runner.run_cells(cfg, workload, reference, store, cells, log=lambda *a: None)
    assert stats.computed == [cells[1].cell_id]
    assert runner.run_cells(cfg, workload, reference, store, cells, log=lambda *a: None).computed == []

    res = store.load(cells[2].cell_id)
    assert res.history["grad_sq"].shape == (2, 3) and res.history["lower_grads"].shape == (2, 3)
    meta = res.meta
    assert meta["hyperparameters"] == {"upper_lr": 0.2, "lower_lr": 0.2, "batch_size": 4} and meta["seeds"] == [0, 1]
    assert meta["traced"]["upper.learning_rate.c"] == 0.2 and meta["traced"]["upper.learning_rate.p"] == 0.6
    assert meta["environment"]["versions"]["jax"] and meta["environment"]["platform"] == "cpu"
    assert {"compile_s", "run_s", "n_devices", "seconds_per_step"} <= set(meta["timings"])
    assert meta["timings"]["compile_s"] >= 0 and meta["timings"]["run_s"] > 0


def test_report_writes_figure_and_table(tmp_path):
    from experiments import convergence
    cfg = tiny(tmp_path, plot={"metrics": ["grad_sq", "lower_gap"], "target": 10.0})
    out = convergence.main(cfg, log=lambda *a: None)
    assert os.path.isfile(out["figure"]) and out["figure"].endswith(".png")
    assert os.path.isfile(os.path.join(C.experiment_dir(cfg), "summary.md"))
    (row,) = out["rows"]                                # curves = "best": one row per algorithm
    assert row.label == "soba" and np.isfinite(row.final) and row.oracles_total > 0
    again = convergence.main(cfg, log=lambda *a: None)  # everything cached: nothing recomputed
    assert again["stats"].computed == []


def test_rates_fit():
    from experiments.rates import Check, fit, tail_indices
    k = np.arange(1.0, 1001.0)
    assert fit(k, 3.0 * k ** -0.4) == pytest.approx(-0.4)
    idx = tail_indices(np.arange(0, 1001.0), 100, 10)
    assert idx[0] >= 100 and idx[-1] == 1000
    assert Check("C", "theta", -0.95, -2 / 3, "bound").verdict().startswith("PASS (bound holds, faster")
    assert Check("C", "phi", -0.5, -2 / 3, "tight").verdict() == "FAIL"


# ---------------------------------------------------------------------------------------------
# sharding: 4 fake CPU devices give the numbers of 1 device

def test_quadratic_metrics_match_closed_forms():
    import jax
    import jax.numpy as jnp
    import bilevel_jax as bj
    from experiments import problems
    from experiments.sweep import Iterate
    # the sizes of `tiny` (another seed): the draw's programs are those of the sweeps' problem
    workload = problems.quadratic(seed=3, dim_upper=2, dim_lower=3, n_samples=16)
    q = bj.problems.quadratic_bilevel(jax.random.PRNGKey(3), dim_upper=2, dim_lower=3, n_samples=16,
                                      lower_spectrum=(0.1, 1.0), upper_spectrum=(0.1, 1.0))
    ref = workload.compute_reference()
    ev = workload.make_eval(["grad_sq", "lower_gap", "value_gap", "theta_err"], ref)

    @jax.jit   # the metrics and the closed forms in one program (eagerly: ~15 one-op compilations)
    def metrics_and_closed_forms(theta, phi):
        return ev(Iterate(theta, phi), workload.instance), {
            "grad_sq": jnp.sum(q.grad(theta) ** 2), "lower_gap": jnp.sum((phi - q.phi_star(theta)) ** 2),
            "value_gap": q.value(theta) - q.value(q.theta_star()), "theta_err": jnp.sum((theta - q.theta_star()) ** 2)}

    m, closed = metrics_and_closed_forms(np.array([0.3, -1.0]), np.array([1.0, -0.5, 0.2]))
    np.testing.assert_allclose(m["grad_sq"], closed["grad_sq"], rtol=1e-10)
    np.testing.assert_allclose(m["lower_gap"], closed["lower_gap"], rtol=1e-10)
    np.testing.assert_allclose(m["value_gap"], closed["value_gap"], rtol=1e-9)
    np.testing.assert_allclose(m["theta_err"], closed["theta_err"], rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# results never hide a failure; references and targets

def test_a_diverged_seed_is_reported_in_the_table_summary_and_figure(tmp_path):
    from experiments import convergence, runner
    from experiments.results import ResultStore
    cfg = tiny(tmp_path, seeds=3, algorithms={"soba": {"upper_lr": 0.1, "lower_lr": 0.2, "batch_size": 4}})
    store = ResultStore(C.experiment_dir(cfg))
    workload, reference = runner.prepare(cfg, store)
    from experiments.sweep import expand
    cells = expand(cfg)
    runner.run_cells(cfg, workload, reference, store, cells, log=lambda *a: None)
    # seed 2 of the run diverges after its first evaluation: NaN iterates, status non-finite
    res = store.load(cells[0].cell_id)
    h = dict(res.history)
    for m in ("grad_sq", "lower_gap"):
        h[m] = h[m].astype(float).copy()
        h[m][2, 1:] = np.nan
    h["finite"] = h["finite"].copy()
    h["finite"][2, 1:] = False
    h["status"] = h["status"].copy()
    h["status"][2, 1:] = 2
    store.save(cells[0].cell_id, h, res.meta)
    lines = []
    out = convergence.report(cfg, store, cells, workload, log=lines.append, reference=reference)
    assert out["rows"][0].failed == "1/3 diverged"
    assert "1/3 diverged" in out["table"] and "seeds failed" in out["table"]
    summary = open(os.path.join(C.experiment_dir(cfg), "summary.md")).read()
    assert "1/3 diverged" in summary and "Failed seeds" in summary
    meta = json.load(open(os.path.join(C.experiment_dir(cfg), "tiny.json")))
    curve = meta["curves"][0]
    assert curve["seeds"] == 3 and curve["failed"] == "1/3 diverged" and curve["drawn"]["grad_sq"] == 2
    assert "1/3 diverged" in curve["legend"] and "2 of 3 seeds" in curve["legend"]


def test_time_to_target_is_when_the_curve_stays_below():
    from experiments.convergence import reach
    x = np.arange(6.0)
    assert reach(x, np.array([1.0, 0.1, 1.0, 0.2, 0.05, 0.01]), 0.3) == 3.0      # not the first crossing at 1
    assert reach(x, np.array([1.0, 0.1, 0.1, 0.1, 0.1, 1.0]), 0.3) == float("inf")
    assert reach(x, np.array([1.0, 0.1, 0.1, np.nan, 0.1, 0.1]), 0.3) == 4.0     # NaN is not below
    assert reach(x, np.full(6, 0.1), 0.3) == 0.0


def test_hyperparameter_text_keeps_batch_size_and_titles_say_what_ran(tmp_path):
    from experiments.convergence import hp_text, title_of
    from experiments.results import CellResult
    r = CellResult("c", {}, {"hyperparameters": {"upper_lr": 0.1, "batch_size": 32}})
    assert "batch_size=32" in hp_text(r)
    cfg = C.load(os.path.join(ROOT, "configs", "quadratic.toml"), ["only=soba,saba"])
    title = title_of(cfg, "quadratic bilevel", False, "F = ...")
    assert "All presets" not in title and "only: soba, saba" in title and "F = ..." in title


def test_hpo_reference_is_feasible_and_not_above_any_point_a_run_reached(tmp_path):
    from experiments import convergence, problems
    cfg = C.from_dict({
        "name": "href", "seeds": 2, "steps": 300, "eval_every": 50, "metrics": ["value_gap", "value"],
        "timing": False, "progress": False, "results_dir": str(tmp_path), "compile_cache": False,
        "problem": {"name": "logreg_hpo", "data": "breast_cancer", "theta_bounds": [-10.0, 2.0],
                    "reference_steps": 60},
        "algorithms": {"soba": {"step": 0.4, "ratio": 0.01, "batch_size": 32}},
        "plot": {"metrics": ["value_gap"], "target": 1e-2}}, source="href")
    inst = problems.build(cfg["problem"]).instance
    out = convergence.main(cfg, log=lambda *a: None)
    ref = out["reference"]                           # the workload's compute_reference(), as the runner got it
    theta = np.asarray(ref["theta_star"])
    assert theta.min() >= -10.0 and theta.max() <= 2.0                            # feasible
    from bilevel_jax.problems import logistic as lg
    assert ref["value_star"] == pytest.approx(float(lg.hyper_value(theta, inst.data)), rel=1e-10)
    assert ref["value_star"] <= float(lg.hyper_value(np.clip(np.asarray(inst.theta0), -10, 2), inst.data))
    values = np.concatenate([np.asarray(r.history["value"]).ravel() for r in out["results"]])
    h_star = out["reference"]["value_star_checked"]
    assert h_star <= np.nanmin(values) + 1e-12 and h_star <= ref["value_star"]
    gaps = np.concatenate([np.asarray(r.history["value_gap"]).ravel() for r in out["results"]])
    assert np.nanmin(gaps) >= 0.0
    assert "h*" in out["reference_note"]


def test_every_config_names_a_known_figure_and_a_typo_gets_the_closest():
    import glob
    import importlib
    main = importlib.import_module("experiments.__main__")
    for path in glob.glob(os.path.join(ROOT, "configs", "*.toml")):
        assert C.load(path)["figure"] in main.FIGURES, path
    with pytest.raises(C.ConfigError, match="unknown figure 'hesian_free'. Did you mean 'hessian_free'"):
        main.figure_module({"figure": "hesian_free"})


def _misspelled(cfg: dict, where: tuple):
    """(a copy of cfg with a misspelled key added to the table at `where`, the key it misspells or
    None for a table with no key to misspell)."""
    import copy
    bad = copy.deepcopy(cfg)
    table = bad
    for part in where:
        table = table[part]
    keys = [k for k in table if k not in ("name", "preset")]
    if not keys:
        table["bogus_key"] = 1
        return bad, None
    table[keys[0] + keys[0][-1]] = table[keys[0]]
    return bad, keys[0]


def test_every_table_of_every_config_rejects_an_unknown_key_with_the_closest_valid_one(tmp_path):
    """configs/*.toml through its figure's `check` (what runs before any work): the shipped config
    passes; a misspelled key in [problem], [options] or an [algorithms.*] table is an error that
    names the key it misspells (top-level and [plot] keys: `config.validate`, tested above)."""
    import glob
    import importlib
    main = importlib.import_module("experiments.__main__")
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.toml"))):
        cfg = C.load(path, [f"results_dir={tmp_path}"])
        module = main.figure_module(cfg)
        module.check(cfg)
        for where in [("problem",), ("options",), *(("algorithms", label) for label in cfg["algorithms"])]:
            bad, key = _misspelled(cfg, where)
            match = ("unknown key.*'bogus_key'" if key is None
                     else rf"unknown key.*'{key}{key[-1]}'.*Did you mean '{key}'\?")
            with pytest.raises(C.ConfigError, match=match):
                module.check(bad)


def test_morbit_rejects_an_unknown_problem_key_and_optimizer_name(tmp_path):
    from experiments import morbit
    cfg = C.load(os.path.join(ROOT, "configs", "morbit.toml"), [f"results_dir={tmp_path}", "problem.taks=5"])
    with pytest.raises(C.UnknownKeys, match=r"\[problem\]: unknown key\(s\) \['taks'\] for problem 'sinusoid'\. "
                                            r"Did you mean 'tasks'\? Valid keys: .*shots.*tasks"):
        morbit.check(cfg)
    cfg = C.load(os.path.join(ROOT, "configs", "morbit.toml"),
                 [f"results_dir={tmp_path}", 'algorithms.robust.lower_opt={name="adamm"}'])
    with pytest.raises(C.UnknownKeys, match=r"unknown optimizer 'adamm' in algorithms.robust.lower_opt\. "
                                            r"Did you mean 'adam'\? Valid optimizers: .*adam, adamax.*sgd"):
        morbit.check(cfg)


def test_keys_are_read_from_the_signatures_and_an_unknown_one_is_structured():
    """A preset's keys are the named parameters of its signature (through `functools.wraps` and the
    presets' `__signature__`) and, for a `**kw`, the loop options it forwards; an unknown key is
    `UnknownKeys` with the closest valid ones, before anything is built."""
    import inspect
    import bilevel_jax as bj
    from experiments import sweep
    named = [n for n in inspect.signature(bj.algorithms.soba).parameters if n not in ("problem", "kw")]
    assert set(sweep.preset_keys("soba")) == {*named, *bj.algorithms.LOOP_OPTIONS, *C.ALGORITHM_SPECIAL}
    assert {"dual_lr", "dual_reg", "uniform"} <= set(sweep.preset_keys("morbit"))        # MULTI_OBJECTIVE too
    with pytest.raises(C.UnknownKeys) as err:
        sweep.build_algorithm(sweep.placeholder_problem(), "soba", {"upper_step": 0.1, "lower_lrr": 0.2}, "t")
    assert err.value.where == "t" and err.value.unknown == ["lower_lrr", "upper_step"]
    assert err.value.closest["lower_lrr"][0] == "lower_lr" and "upper_lr" in err.value.closest["upper_step"]
    assert "upper_lr" in err.value.valid and "batch_size" in err.value.valid


def test_an_optimizer_table_builds_the_optax_rule():
    """`lower_opt = {name = "adam"}` is optax.adam(lower_lr); `clip` chains a global-norm clip;
    equal tables build equal (hashable) rules, so their cells share one compiled function."""
    import jax
    import optax
    from experiments import sweep
    pairs = [(sweep.make_optimizer(spec, 0.1, "t"), rule) for spec, rule in (
        ({"name": "adam"}, optax.adam(0.1)),
        ({"name": "sgd", "clip": 1.0}, optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))),
        ({"name": "sgd", "learning_rate": 0.5}, optax.sgd(0.5)))]

    @jax.jit   # every first update in one program (eagerly: ~20 one-op compilations)
    def first_updates(g):
        return [tuple(opt.update(g, opt.init(g))[0]["w"] for opt in pair) for pair in pairs]

    for built, rule in first_updates({"w": np.array([3.0, -4.0])}):
        np.testing.assert_allclose(built, rule, rtol=1e-12)
    assert sweep.make_optimizer({"name": "adam"}, 0.1, "t") == sweep.make_optimizer({"name": "adam"}, 0.1, "t")
    with pytest.raises(C.UnknownKeys, match=r"t: unknown key\(s\) \['bta1'\] for 'adam'\. Did you mean 'b1'"):
        sweep.make_optimizer({"name": "adam", "bta1": 0.8}, 0.1, "t")


def test_a_problem_drawn_per_seed_runs_through_the_runner_as_separate_runs(tmp_path):
    """LancBiO's synthetic problem is drawn per seed (`Workload.for_seed`): the runner stacks what
    differs between the seeds' instances with the rows, and every seed's recorded iterates and
    metrics (the residual of the method's v) equal a separate `bj.run` on that seed's instance and
    the closed form; a rerun computes nothing (the figure's cells are cached)."""
    import importlib
    import jax
    import bilevel_jax as bj
    from experiments import lancbio, sweep
    syn = importlib.import_module("bilevel_jax.problems.lancbio_synthetic")
    cfg = C.load(os.path.join(ROOT, "configs", "lancbio.toml"), [
        f"results_dir={tmp_path}", "problem.n=4", "problem.kappa=10.0", "steps=4", "eval_every=2", "seeds=2",
        "only=SOBA", "algorithms.SOBA.steps=4", 'metrics=["residual"]', 'plot.metrics=["residual"]',
        "progress=false", "compile_cache=false", "timing=false"])
    out = lancbio.main(cfg, log=lambda *a: None)
    assert set(out["summary"]["algorithms"]) == {"SOBA"} and "residual" in out["text"]
    (cell,) = sweep.expand(cfg)
    hist = out["results"]["SOBA"].history
    residual = jax.jit(jax.vmap(syn.residual, in_axes=(None, 0, 0, 0)))   # of all evaluations at once
    for j, seed in enumerate([0, 1]):
        # the runner's dtype argument (a np.dtype, not the jnp.float64 type): the draw's program is reused
        inst = bj.problems.lancbio_synthetic(jax.random.PRNGKey(seed), 4, 10.0, np.dtype("float64"))
        alg = sweep.build_algorithm(inst.problem, cell.preset, cell.spec)
        state = alg.init(inst.theta0, inst.phi0, jax.random.PRNGKey(seed), inst.data)
        _, single = bj.run(alg, state, inst.data, num_steps=4, eval_every=2, eval_fn=sweep.record_iterates)
        np.testing.assert_allclose(hist["theta"][j], single["theta"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(hist["residual"][j], residual(inst.data, single["theta"], single["phi"],
                                                                 single["v"]), rtol=1e-10)
    assert lancbio.main(cfg, log=lambda *a: None)["stats"].computed == []


def test_morbit_runs_a_multi_objective_preset_through_the_runner(tmp_path):
    """The MORBiT figure at a tiny size: a `bj.algorithms.MULTI_OBJECTIVE` preset built from its
    table (optax rules from `upper_opt`/`lower_opt` tables), the sinusoid tasks and the embedding
    MLP drawn per seed, the task-loss metrics at the ridge heads."""
    from experiments import morbit
    cfg = C.load(os.path.join(ROOT, "configs", "morbit.toml"), [
        f"results_dir={tmp_path}", "problem.tasks=2", "problem.test_tasks=2", "problem.support=6", "problem.query=6",
        "problem.shots=3", "problem.width=4", "problem.depth=1", "steps=2", "eval_every=1", "seeds=2", "only=robust",
        "algorithms.robust.batch_size=3", "options.fashion_mnist=false", "progress=false", "compile_cache=false"])
    out = morbit.main(cfg, log=lambda *a: None)
    hist = out["results"]["MORBiT (robust)"]
    for m in morbit.METRICS:
        assert hist[m].shape == (2, 3) and np.all(np.isfinite(hist[m])), m
    assert not np.array_equal(hist["train_max"][0], hist["train_max"][1])       # each seed its own tasks
    assert "(a) Sinusoid meta-regression" in "\n".join(out["summary"])


def test_demo_table_formats_every_column():
    """`make demo`'s summary table (the figure's shared formatter: "not reached" for a target never
    kept, "-" for nothing to report)."""
    import types
    from experiments import demo
    row = types.SimpleNamespace(label="soba", failed="0/3", final=0.02, final_lo=0.01, final_hi=0.03,
                                time_to_target=float("inf"), oracles_to_target=None, oracles_total=8e4,
                                hyper="step=0.4")
    text = demo._table([row], 0.01)
    assert "soba" in text and "2.00e-02 [1.00e-02, 3.00e-02]" in text and "not reached" in text
    assert " - " in text and "8e+04" in text and "step=0.4" in text
