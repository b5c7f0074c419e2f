"""Problem factories by name: `build(problem_cfg)` -> `Workload` (a `bj.problems.Instance` and
how the runs on it are measured).

    quadratic    bj.problems.quadratic_bilevel (closed forms: grad F, theta*, phi*(theta), F*)
    logreg_hpo   bj.problems.logistic_hpo on IJCNN1 (files or the IJCNN1-shaped generator),
                 scikit-learn's breast cancer, or the generator at any size; h* by L-BFGS

The keys of a `[problem]` table are the fields of the problem's options dataclass
(`QuadraticOptions`, `LogregOptions`); `check` builds the options, so an unknown key is a
one-line ConfigError listing the valid ones, before any data are loaded.

Metrics are pure functions `(iterate, instance) -> scalar` of the recorded iterates
(`experiments.sweep.Iterate`: theta, phi, v) and the instance (its data and arrays are arguments,
never closures); only the requested ones are computed. Reference values (F*, h*) are computed once
by `Workload.compute_reference` and passed to `Workload.make_eval`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

import bilevel_jax as bj
from bilevel_jax.problems import Instance
from experiments.config import ConfigError, check_keywords


class Workload(NamedTuple):
    """What a figure runs: the problem instance (`instance.description` names it in titles and
    logs) and how the runs on it are measured."""

    instance: Instance
    synthetic: bool                         # the data are generated (titles say so)
    metric_names: tuple                     # what make_eval can record
    compute_reference: Callable[[], dict]   # -> JSON-able floats/lists (F*, h*, ...)
    make_eval: Callable                     # (names, reference) -> eval_fn(iterate, instance) -> dict
    notes: str = ""                         # what the plotted quantities mean (written on the figure)


def _sq(x):
    return jnp.sum(jnp.square(x))


# --------------------------------------------------------------------------------------------------
# quadratic

QUADRATIC_METRICS = ("grad_sq", "value_gap", "theta_err", "lower_gap", "value")


@dataclasses.dataclass(frozen=True)
class QuadraticOptions:
    """The keys of a `[problem] name = "quadratic"` table (see `quadratic`)."""

    seed: int = 0
    dim_upper: int = 5
    dim_lower: int = 10
    n_samples: Optional[int] = 256
    lower_spectrum: Sequence[float] = (0.1, 1.0)
    upper_spectrum: Sequence[float] = (0.1, 1.0)
    cross: float = 0.1
    reg: float = 1.0
    noise: float = 1.0
    lower_cross: Optional[float] = None
    theta_shift: float = 0.0
    phi_shift: float = 0.0
    lower_hessian_noise: bool = True


def quadratic(**options) -> Workload:
    """The stochastic (finite-sum, `n_samples`; 0 = deterministic) quadratic bilevel problem;
    `options` are the fields of `QuadraticOptions`.

    Starts at theta0 = theta_shift * 1, phi0 = phi_shift * 1. `lower_hessian_noise = false`
    replaces the rank-one per-sample LL Hessians by their mean (exact Hessian-vector products,
    noisy gradients). Metrics (closed forms): grad_sq = ||grad F(theta)||^2, value_gap = F(theta) -
    F*, theta_err = ||theta - theta*||^2, lower_gap = ||phi - phi*(theta)||^2, value = F(theta).
    """
    o = options_of("quadratic", options)
    q = bj.problems.quadratic_bilevel(jax.random.PRNGKey(o.seed), dim_upper=o.dim_upper, dim_lower=o.dim_lower,
                                      n_samples=o.n_samples or None, lower_spectrum=tuple(o.lower_spectrum),
                                      upper_spectrum=tuple(o.upper_spectrum), cross=o.cross, reg=o.reg,
                                      noise=o.noise, lower_cross=o.lower_cross)
    data = q.data
    if not o.lower_hessian_noise:
        upper, lower = data
        lower = dict(lower, H=jnp.broadcast_to(q.means["H"], lower["H"].shape))
        data = (upper, lower)
    kind = f"{o.n_samples} samples" if o.n_samples else "deterministic"
    if o.n_samples and not o.lower_hessian_noise:
        kind += ", exact LL Hessians"
    q = q._replace(data=data, theta0=q.theta0 + o.theta_shift, phi0=q.phi0 + o.phi_shift,
                   description=f"quadratic bilevel (d_theta={o.dim_upper}, d_phi={o.dim_lower}, {kind})")

    def compute_reference():
        return {"theta_star": [float(t) for t in q.reference.theta], "value_star": float(q.reference.value)}

    def make_eval(names, reference):
        # the closed forms of bj.problems.quadratic_bilevel (the one place they are written)
        ts = jnp.asarray(reference["theta_star"], q.theta0.dtype)
        f_star = reference["value_star"]
        fns = {
            "grad_sq": lambda s, inst: _sq(inst.grad(s.theta)),
            "value_gap": lambda s, inst: inst.value(s.theta) - f_star,
            "value": lambda s, inst: inst.value(s.theta),
            "theta_err": lambda s, inst: _sq(s.theta - ts),
            "lower_gap": lambda s, inst: _sq(s.phi - inst.phi_star(s.theta)),
        }
        return _select(fns, names)

    notes = "F(theta) = f_upper(theta, phi*(theta)); grad F, F*, theta*, phi*(theta) in closed form"
    return Workload(q, False, QUADRATIC_METRICS, compute_reference, make_eval, notes)


# --------------------------------------------------------------------------------------------------
# logistic-regression hyperparameter selection

LOGREG_METRICS = ("value", "value_gap", "grad_sq", "val_loss", "train_loss", "lower_gap", "val_error",
                  "test_loss", "test_value", "test_error")
LOGREG_DATA = ("ijcnn1", "ijcnn1_like", "breast_cancer")


def _load_logreg_data(data: str, path, n_train, n_val, data_seed, val_fraction):
    from bilevel_jax import datasets
    if data == "ijcnn1":
        sizes = {k: v for k, v in (("n_train", n_train), ("n_val", n_val)) if v}
        loaded = datasets.ijcnn1(path, key=data_seed, **sizes)
        return loaded.data, loaded.source, loaded.synthetic
    if data == "ijcnn1_like":
        sizes = {k: v for k, v in (("n_train", n_train), ("n_val", n_val)) if v}
        return datasets.ijcnn1_like(data_seed, **sizes), f"{datasets.SYNTHETIC_IJCNN1} (seed {data_seed})", True
    if data == "breast_cancer":
        return (datasets.breast_cancer(data_seed, val_fraction=val_fraction),
                "breast cancer (scikit-learn, 569 x 30)", False)
    raise ConfigError(f"unknown logreg_hpo data {data!r}; valid: {', '.join(LOGREG_DATA)}.")


@dataclasses.dataclass(frozen=True)
class LogregOptions:
    """The keys of a `[problem] name = "logreg_hpo"` table (see `logreg_hpo`)."""

    data: str = "ijcnn1"
    path: Optional[str] = None
    n_train: int = 0
    n_val: int = 0
    data_seed: int = 0
    val_fraction: float = 0.5
    seed: int = 0
    per_feature: bool = True
    theta_init: str = "log_uniform"
    phi_init: str = "normal"
    eval_newton_steps: int = 6
    reference_steps: int = 200
    test_fraction: float = 0.0
    theta_shift: float = 0.0
    theta_bounds: Optional[Sequence[float]] = (-12.0, 12.0)


def logreg_hpo(**options) -> Workload:
    """Dagréou et al. 2022's hyperparameter selection (arXiv:2201.13409): logistic regression with one regulariser exp(theta_k)
    per feature (`bj.problems.logistic_hpo`); `options` are the fields of `LogregOptions`.

    data: "ijcnn1" (libsvm files from `path` or $BILEVEL_JAX_IJCNN1, else the IJCNN1-shaped
      generator with n_train/n_val rows, 0 = IJCNN1's sizes), "ijcnn1_like" (always generated),
      "breast_cancer" (scikit-learn, split by val_fraction). `seed` draws the starting point.
      test_fraction > 0 holds out that share of the validation rows as a test set (never seen by
      the algorithms) for the test_* metrics. theta_shift is added to the initial theta (e.g. -4
      starts with little regularisation: an ill-conditioned LL Hessian). theta_bounds: the UL
      projection (clip) applied after every UL step, [-12, 12] as the benchmark's prox; [] = none.
    Metrics: value = h(theta) (w*(theta) by `eval_newton_steps` damped Newton steps warm-started at
    the current phi), value_gap = h(theta) - h* (h* by `reference_steps` L-BFGS steps), grad_sq =
    ||grad h||^2 (dense implicit gradient), val_loss / train_loss = the losses of the current phi,
    lower_gap = ||phi - w*(theta)||^2, val_error = validation misclassification rate of phi.
    """
    from bilevel_jax.problems import logistic as lg
    o = options_of("logreg_hpo", options)
    raw, source, synthetic = _load_logreg_data(o.data, o.path, o.n_train, o.n_val, o.data_seed, o.val_fraction)
    test = None
    if o.test_fraction:
        if not 0.0 < o.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must lie in (0, 1), got {o.test_fraction!r}.")
        (Xv, yv), lower = raw
        n_test = int(round(o.test_fraction * Xv.shape[0]))
        test = (Xv[:n_test], yv[:n_test])
        raw = ((Xv[n_test:], yv[n_test:]), lower)
    hpo = bj.problems.logistic_hpo(raw, o.seed, per_feature=o.per_feature, theta_init=o.theta_init,
                                   phi_init=o.phi_init)
    problem = hpo.problem
    if o.theta_bounds:
        lo, hi = (float(b) for b in o.theta_bounds)
        problem = dataclasses.replace(problem, project_upper=lambda t: jnp.clip(t, lo, hi))
    (Xv, _), (X, _) = raw
    held = f", n_test={test[0].shape[0]}" if test else ""
    hpo = hpo._replace(theta0=problem.project(hpo.theta0 + o.theta_shift), problem=problem,
                       description=f"logistic HPO on {source}: n_train={X.shape[0]}, n_val={Xv.shape[0]}{held}, "
                                   f"d={X.shape[1]}")

    def w_star(theta, phi, d):
        # warm start at the recorded phi, or at 0 when phi is worse (a diverged run)
        zero = jnp.zeros_like(phi)
        start = jnp.where(problem.f_lower(theta, phi, d[1]) < problem.f_lower(theta, zero, d[1]), phi, zero)
        return lg.newton_phi_star(theta, d[1], phi0=start, newton_steps=o.eval_newton_steps)

    def value(s, inst):
        return problem.f_upper(s.theta, w_star(s.theta, s.phi, inst.data), inst.data[0])

    def grad_sq(s, inst):
        d = inst.data
        g = lg.implicit_grad(jnp.broadcast_to(s.theta, s.phi.shape), w_star(s.theta, s.phi, d), d)
        return _sq(g.sum() if jnp.ndim(s.theta) == 0 else g)

    def error(w, batch):
        X, y = batch
        return jnp.mean((y * (X @ w) <= 0).astype(X.dtype))

    def no_test(s, inst):
        raise ConfigError("the test_* metrics need problem.test_fraction > 0.")

    bounds = tuple(float(b) for b in o.theta_bounds) if o.theta_bounds else None

    def compute_reference():
        return box_reference(hpo, bounds, o.reference_steps)

    def make_eval(names, reference):
        h_star = reference["value_star"]
        fns = {
            "value": value,
            "value_gap": lambda s, inst: value(s, inst) - h_star,
            "grad_sq": grad_sq,
            "val_loss": lambda s, inst: problem.f_upper(s.theta, s.phi, inst.data[0]),
            "train_loss": lambda s, inst: problem.f_lower(s.theta, s.phi, inst.data[1]),
            "lower_gap": lambda s, inst: _sq(s.phi - w_star(s.theta, s.phi, inst.data)),
            "val_error": lambda s, inst: error(s.phi, inst.data[0]),
            "test_loss": (lambda s, inst: problem.f_upper(s.theta, s.phi, test)) if test else no_test,
            "test_value": ((lambda s, inst: problem.f_upper(s.theta, w_star(s.theta, s.phi, inst.data), test))
                           if test else no_test),
            "test_error": (lambda s, inst: error(s.phi, test)) if test else no_test,
        }
        return _select(fns, names)

    d = int(jnp.size(hpo.theta0))
    box = f"the box [{bounds[0]:g}, {bounds[1]:g}]^{d} the runs project onto" if bounds else f"R^{d}"
    notes = (f"h(theta) = validation logistic loss of w*(theta) = argmin training loss + 1/2 sum_k exp(theta_k) w_k^2; "
             f"h* = min of h over {box} (L-BFGS-B, checked against every point a run reached)")
    return Workload(hpo, synthetic, LOGREG_METRICS, compute_reference, make_eval, notes)


def box_reference(hpo, bounds, steps: int = 200) -> dict:
    """h* = min of h over the feasible set the runs use: the box `bounds = (lo, hi)` on every
    theta_k (None: unconstrained), by SciPy's L-BFGS-B (Byrd, Lu, Nocedal, Zhu 1995) on the exact
    h and its closed-form gradient (`bj.problems.logistic`: Newton for w*, dense implicit
    gradient), started from the projected theta0, from the box's centre and from the projected
    unconstrained L-BFGS solution; the best of the three. Returns the value, the minimiser (in the
    box), the projected-gradient norm ||theta - P(theta - grad h)|| (0 at a box-constrained
    stationary point) and h(theta0)."""
    import numpy as np
    from scipy.optimize import minimize

    from bilevel_jax.problems import logistic as lg
    theta0 = np.asarray(hpo.theta0, dtype=np.float64)
    shape = theta0.shape
    project = (lambda t: np.clip(t, *bounds)) if bounds else (lambda t: t)

    def fun(t):
        w, value, grad = lg._evaluate(jnp.asarray(t.reshape(shape) if shape else t[0], hpo.theta0.dtype)
                                      * jnp.ones(hpo.data[1][0].shape[1]), hpo.data, hpo.newton_steps)
        g = np.asarray(grad, dtype=np.float64)
        return float(value), (g if shape else np.array([g.sum()]))

    starts = [project(theta0), project(np.zeros_like(theta0) + (0.5 * sum(bounds) if bounds else 0.0)),
              project(np.asarray(hpo.solve_value(steps=steps).theta, dtype=np.float64))]
    best = None
    for x0 in starts:
        res = minimize(fun, np.atleast_1d(x0).ravel(), jac=True, method="L-BFGS-B",
                       bounds=[bounds] * max(theta0.size, 1) if bounds else None,
                       options={"maxiter": steps, "maxfun": 2 * steps, "ftol": 1e-14, "gtol": 1e-10})
        if best is None or res.fun < best.fun:
            best = res
    theta = project(best.x)
    value, grad = fun(theta)
    pg = float(np.linalg.norm(theta - project(theta - grad)))
    return {"value_star": value, "value_star_grad_norm": pg, "theta_star": [float(t) for t in np.atleast_1d(theta)],
            "value_star_method": ("L-BFGS-B in the box [%g, %g]" % bounds) if bounds else "L-BFGS-B, unconstrained",
            "theta_bounds": list(bounds) if bounds else None,
            "value_initial": float(fun(np.atleast_1d(theta0).ravel())[0])}


# --------------------------------------------------------------------------------------------------

PROBLEMS: Dict[str, Callable[..., Workload]] = {"quadratic": quadratic, "logreg_hpo": logreg_hpo}
OPTIONS: Dict[str, type] = {"quadratic": QuadraticOptions, "logreg_hpo": LogregOptions}
METRICS: Dict[str, Tuple[str, ...]] = {"quadratic": QUADRATIC_METRICS, "logreg_hpo": LOGREG_METRICS}


def options_of(name: str, options: dict):
    """The options of problem `name` built from a table's keys; an unknown key is `UnknownKeys`
    listing the valid ones (the fields of the options dataclass)."""
    cls = OPTIONS[name]
    check_keywords(options, [f.name for f in dataclasses.fields(cls)], "[problem]", f"problem {name!r}")
    return cls(**options)


def _select(fns: dict, names) -> Callable:
    unknown = [n for n in names if n not in fns]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; valid metrics: {', '.join(sorted(fns))}.")
    chosen = {n: fns[n] for n in names}
    return lambda iterate, instance: {n: f(iterate, instance) for n, f in chosen.items()}


def check(problem_cfg: dict, metrics: Sequence[str] = ()) -> None:
    """Validate a [problem] table (name; keys, by building its options) and metric names, without
    loading data or building the problem."""
    name = problem_cfg.get("name")
    if name not in PROBLEMS:
        raise ConfigError(f"unknown problem {name!r}; valid problems: {', '.join(sorted(PROBLEMS))}.")
    options_of(name, {k: v for k, v in problem_cfg.items() if k != "name"})
    valid = METRICS[name]
    bad = [m for m in metrics if m not in valid]
    if bad:
        raise ConfigError(f"unknown metric(s) {bad} for problem {name!r}; valid metrics: {', '.join(valid)}.")


def build(problem_cfg: dict) -> Workload:
    check(problem_cfg)
    kwargs = {k: v for k, v in problem_cfg.items() if k != "name"}
    return PROBLEMS[problem_cfg["name"]](**kwargs)


__all__ = ["LogregOptions", "METRICS", "OPTIONS", "PROBLEMS", "QuadraticOptions", "Workload", "build", "check",
           "logreg_hpo", "options_of", "quadratic"]
