"""Problem factories by name: `build(problem_cfg)` -> `Workload` (a `bj.problems.Instance` and
how the runs on it are measured).

    quadratic          bj.problems.quadratic_bilevel (closed forms: grad F, theta*, phi*(theta), F*)
    logreg_hpo         bj.problems.logistic_hpo on IJCNN1 (files or the IJCNN1-shaped generator),
                       scikit-learn's breast cancer, or the generator at any size; h* by L-BFGS
    lancbio_synthetic  bj.problems.lancbio_synthetic, drawn per seed (dense closed-form metrics)
    hyperclean         bj.problems.fashion_mnist_hyper_cleaning; corruption and start per seed
    sinusoid           robust sinusoid meta-regression (MORBiT), tasks and start per seed
    fmnist_pairs       robust multi-task learning on Fashion-MNIST class pairs (MORBiT)

The keys of a `[problem]` table are the fields of the problem's options dataclass
(`QuadraticOptions`, `LogregOptions`, ...); `check` builds the options, so an unknown key is a
one-line `UnknownKeys` listing the valid ones, before any data are loaded. A problem drawn per
seed gives `Workload.for_seed`; the runner then stacks what differs between the seeds' instances
(`experiments.sweep.PerSeed`).

Metrics are pure functions `(iterate, instance) -> scalar` of the recorded iterates
(`experiments.sweep.Iterate`: theta, phi, v) and the instance (its data and arrays are arguments,
never closures); only the requested ones are computed. Reference values (F*, h*) are computed once
by `Workload.compute_reference` and passed to `Workload.make_eval`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import bilevel_jax as bj
from bilevel_jax.problems.instance import Instance, instance_type
from experiments.config import ConfigError, check_keywords


class Workload(NamedTuple):
    """What a figure runs: the problem instance (`instance.description` names it in titles and
    logs; seed 0's when `for_seed` draws one per seed) and how the runs on it are measured."""

    instance: Instance
    synthetic: bool                         # the data are a generated stand-in for real ones (titles say so)
    metric_names: tuple                     # what make_eval can record
    compute_reference: Callable[[], dict]   # -> JSON-able floats/lists (F*, h*, ...)
    make_eval: Callable                     # (names, reference) -> eval_fn(iterate, instance) -> dict
    notes: str = ""                         # what the plotted quantities mean (written on the figure)
    for_seed: Optional[Callable[[int], Instance]] = None   # the instance of a seed (data, start drawn from it)

    def instances(self, seeds: Sequence[int]) -> List[Instance]:
        """The instance each seed runs on: `instance` for all, or `for_seed(seed)`."""
        return [self.instance if self.for_seed is None else self.for_seed(s) for s in seeds]


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

LOGREG_METRICS = ("value", "value_gap", "grad_sq", "grad_map_sq", "val_loss", "train_loss", "lower_gap", "val_error",
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
    ||grad h||^2 (dense implicit gradient), grad_map_sq = ||G_1(theta)||^2 = ||theta - P(theta -
    grad h)||^2, the gradient mapping of the theta_bounds box (`bj.stationarity`; grad_sq without
    bounds; recorded with grad_sq whenever the box is on, and plotted in its place by
    `experiments.convergence`: ||grad h|| need not vanish at a solution on the box's boundary),
    val_loss / train_loss = the losses of the current phi, lower_gap = ||phi - w*(theta)||^2,
    val_error = validation misclassification rate of phi.
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

    def hypergrad(s, inst):
        d = inst.data
        g = lg.implicit_grad(jnp.broadcast_to(s.theta, s.phi.shape), w_star(s.theta, s.phi, d), d)
        return g.sum() if jnp.ndim(s.theta) == 0 else g

    onto_box = bj.stationarity.projection(problem.project) if o.theta_bounds else None

    def grad_map_sq(s, inst):
        return _sq(bj.stationarity.gradient_mapping(s.theta, hypergrad(s, inst), 1.0, onto_box))

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
        if onto_box is not None and "grad_sq" in names and "grad_map_sq" not in names:
            names = [*names, "grad_map_sq"]       # the box's stationarity measure, plotted for grad_sq
        fns = {
            "value": value,
            "value_gap": lambda s, inst: value(s, inst) - h_star,
            "grad_sq": lambda s, inst: _sq(hypergrad(s, inst)),
            "grad_map_sq": grad_map_sq,
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
# problems drawn per seed: LancBiO's synthetic problem, hyper-cleaning, robust multi-task learning

def _float_dtype():
    """float64 when x64 is on (the config's `x64`), else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


LANCBIO_METRICS = ("hypergrad_norm", "residual", "lower_grad_norm", "value")


@dataclasses.dataclass(frozen=True)
class LancbioOptions:
    """The keys of a `[problem] name = "lancbio_synthetic"` table (see `lancbio_synthetic`)."""

    n: int = 200
    kappa: float = 1e3
    newton_steps: int = 6


def lancbio_synthetic(**options) -> Workload:
    """LancBiO's synthetic problem (`bj.problems.lancbio_synthetic`; Yang, Gao & Yuan, ICLR 2025,
    arXiv:2404.03331), drawn per seed (G, D1, D2, D3 and the start from `PRNGKey(seed)`).

    Metrics of the recorded iterates (closed forms of the problem module, dense):
    hypergrad_norm = ||grad Phi(theta_k)|| (phi*(theta_k) by `newton_steps` Newton steps from
    phi_k, v* by a dense solve); residual = ||A v_k - b|| at (theta_k, phi_k) and the method's v_k
    (NaN without one); lower_grad_norm = ||grad_phi g(theta_k, phi_k)||; value = f(theta_k, phi*(theta_k))."""
    syn = importlib.import_module("bilevel_jax.problems.lancbio_synthetic")   # the module, not its builder
    o = options_of("lancbio_synthetic", options)

    @functools.lru_cache(maxsize=None)
    def for_seed(seed: int) -> Instance:
        return bj.problems.lancbio_synthetic(jax.random.PRNGKey(seed), o.n, float(o.kappa), _float_dtype())

    def make_eval(names, reference):
        _check_metrics(names, LANCBIO_METRICS)

        def evaluate(s, inst):
            star = syn.phi_star(inst.data, s.theta, s.phi, o.newton_steps)
            values = {"hypergrad_norm": lambda: jnp.linalg.norm(syn.hypergradient(inst.data, s.theta, star)),
                      "residual": lambda: syn.residual(inst.data, s.theta, s.phi, s.v),
                      "lower_grad_norm": lambda: jnp.linalg.norm(syn.lower_grad(inst.data, s.theta, s.phi)),
                      "value": lambda: syn.f_upper(s.theta, star, inst.data[0])}
            return {m: values[m]() for m in names}

        return evaluate

    notes = ("Phi(theta) = f(theta, phi*(theta)); grad Phi with phi* by Newton and v* by a dense solve; "
             "residual ||A v - b|| of the method's v")
    return Workload(for_seed(0), False, LANCBIO_METRICS, dict, make_eval, notes, for_seed)


HYPERCLEAN_METRICS = ("test_accuracy", "test_loss", "val_loss", "residual", "downweighted", "clean_downweighted")


@dataclasses.dataclass(frozen=True)
class HypercleanOptions:
    """The keys of a `[problem] name = "hyperclean"` table (see `hyperclean`)."""

    data: str = "fashion_mnist"
    path: str = ""
    corruption: float = 0.5
    n_train: int = 5000
    n_val: int = 5000
    n_test: int = 10000
    val_split: str = "train"
    model: str = "linear"
    hidden: int = 64
    depth: int = 1
    reg: float = 0.01
    data_seed: int = 0

    def __post_init__(self):
        if self.data != "fashion_mnist":
            raise ConfigError(f"[problem] data must be 'fashion_mnist', got {self.data!r}.")
        from bilevel_jax.problems.hyperclean import MODELS, VAL_SPLITS
        for key, valid in (("val_split", VAL_SPLITS), ("model", MODELS)):
            if getattr(self, key) not in valid:
                raise ConfigError(f"[problem] {key} must be one of {valid}, got {getattr(self, key)!r}.")


@eqx.filter_jit
def _init_like(phi0, key):
    """A fresh Kaiming-normal draw with phi0's structure (fan-in = last axis of each matrix; one
    compiled call for all of a model's leaves)."""
    leaves, treedef = jax.tree_util.tree_flatten(eqx.filter(phi0, eqx.is_inexact_array))
    keys = jax.random.split(key, max(len(leaves), 1))
    new = [jax.random.normal(k, x.shape, x.dtype) * jnp.sqrt(2.0 / x.shape[-1]) if x.ndim == 2 else jnp.zeros_like(x)
           for k, x in zip(keys, leaves)]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, new), phi0)


def hyperclean(**options) -> Workload:
    """Data hyper-cleaning on Fashion-MNIST (`bj.problems.fashion_mnist_hyper_cleaning`, the split
    of the LancBiO experiments, arXiv:2404.03331): the images and the split from `data_seed`; per
    seed, the corruption of the training labels and the model's initial weights (from
    `PRNGKey(1000 + seed)`). Float64 or float32 as the config's `x64`.

    Metrics: test_accuracy, test_loss (of phi_k on the test images), val_loss, residual
    (||A_k v_k - b_k||, NaN for a method without v), downweighted (share of corrupted training
    samples with sigmoid(lambda_i) < 1/2), clean_downweighted (the same share of the clean ones)."""
    from bilevel_jax.problems import hyperclean as hc
    o = options_of("hyperclean", options)
    base = hc.fashion_mnist_hyper_cleaning(
        float(o.corruption), int(o.data_seed), n_train=int(o.n_train), n_val=int(o.n_val), n_test=int(o.n_test),
        path=o.path or None, val_split=o.val_split, model=o.model, hidden=int(o.hidden), depth=int(o.depth),
        reg=float(o.reg), dtype=_float_dtype())

    @functools.lru_cache(maxsize=None)
    def for_seed(seed: int) -> Instance:
        k_noise, k_init, _ = jax.random.split(jax.random.PRNGKey(1000 + seed), 3)
        noisy, mask = hc.corrupt_labels(base.clean_labels, float(o.corruption), k_noise)
        (Xv, yv), (X, _, idx) = base.data
        return base._replace(data=((Xv, yv), (X, jnp.asarray(noisy, jnp.int32), idx)), corrupted=jnp.asarray(mask),
                             phi0=_init_like(base.phi0, k_init))

    def make_eval(names, reference):
        fns = {
            "test_accuracy": lambda s, inst: hc.accuracy(s.phi, inst.test),
            "test_loss": lambda s, inst: hc.loss(s.phi, inst.test),
            "val_loss": lambda s, inst: hc.loss(s.phi, inst.data[0]),
            "residual": lambda s, inst: hc.residual(inst.problem, s.theta, s.phi, s.v, inst.data),
            "downweighted": lambda s, inst: hc.downweighted(s.theta, inst.corrupted)[0],
            "clean_downweighted": lambda s, inst: 1.0 - hc.downweighted(s.theta, inst.corrupted)[1],
        }
        return _select(fns, names)

    notes = (r"h(lambda) = validation CE of W*(lambda); lower level: $\frac{1}{n}\sum_i \sigma(\lambda_i) CE_i + $"
             f"{o.reg:g}" r"$\|W\|^2$")
    return Workload(for_seed(0), False, HYPERCLEAN_METRICS, dict, make_eval, notes, for_seed)


@instance_type
class MultiTask(Instance):
    """A robust multi-task instance: the training tasks as `data` (a leading task axis) and held-out
    test tasks `test` (the same layout) on which the metrics refit the heads."""

    test: Any


SINUSOID_METRICS = ("train_max", "train_mean", "test_max", "test_mean")


@dataclasses.dataclass(frozen=True)
class SinusoidOptions:
    """The keys of a `[problem] name = "sinusoid"` table (see `sinusoid`)."""

    tasks: int = 20         # training tasks (the objectives of the robust problem)
    test_tasks: int = 10    # unseen tasks, heads fitted on `shots` samples
    shots: int = 10
    support: int = 100      # LL sample pool per training task
    query: int = 100        # UL sample pool per task
    embed_dim: int = 10
    width: int = 80
    depth: int = 2
    reg: float = 0.1        # the heads' ridge (reg/2)||w||^2

    def __post_init__(self):
        if isinstance(self.tasks, bool) or not isinstance(self.tasks, int) or self.tasks < 2:
            raise ConfigError(f"[problem] tasks must be an int >= 2, got {self.tasks!r}.")


def sinusoid(**options) -> Workload:
    """Robust sinusoid meta-regression (Gu, Lu, Ram, Weng, ICLR 2023, arXiv:2203.01924;
    `bj.problems.multitask.sinusoid_tasks`): a shared MLP embedding theta, per-task ridge heads
    phi_i; per seed, the training and test tasks and the embedding's initialisation. Metrics at the
    closed-form ridge heads of the current embedding (`bj.problems.multitask.task_losses`): the
    maximum and mean query loss over the training tasks (train_*) and the unseen tasks (test_*)."""
    from bilevel_jax.problems import multitask as mt
    o = options_of("sinusoid", options)

    @functools.lru_cache(maxsize=None)
    def for_seed(seed: int) -> Instance:
        k_train, k_test, k_init = jax.random.split(jax.random.PRNGKey(seed), 3)
        tasks = mt.sinusoid_tasks(k_train, o.tasks, o.support, o.query, o.reg)
        test = mt.sinusoid_tasks(k_test, o.test_tasks, o.shots, o.query, o.reg)
        theta0 = mt.embedding_mlp(k_init, o.embed_dim, o.width, o.depth)
        return MultiTask(tasks.problem, tasks.data, theta0, jnp.zeros((o.tasks, o.embed_dim)), test.data,
                         name="sinusoid", description=f"sinusoid robust meta-regression: {o.tasks} train / "
                                                      f"{o.test_tasks} test tasks")

    def make_eval(names, reference):
        fns = {"train_max": lambda s, inst: jnp.max(mt.task_losses(s.theta, inst.data, o.reg)),
               "train_mean": lambda s, inst: jnp.mean(mt.task_losses(s.theta, inst.data, o.reg)),
               "test_max": lambda s, inst: jnp.max(mt.task_losses(s.theta, inst.test, o.reg)),
               "test_mean": lambda s, inst: jnp.mean(mt.task_losses(s.theta, inst.test, o.reg))}
        return _select(fns, names)

    return Workload(for_seed(0), False, SINUSOID_METRICS, dict, make_eval,
                    "task losses at the closed-form ridge heads of the current embedding", for_seed)


FMNIST_PAIRS = [(0, 6), (0, 9), (1, 7), (2, 4), (2, 7), (2, 9), (3, 7), (3, 9)]
FMNIST_METRICS = ("test_max", "test_mean")


def _pair_logistic(theta, w, batch):
    x, y = batch
    return jnp.mean(jax.nn.softplus(-y * ((x @ theta) @ w)))


class PairLower(eqx.Module):
    """A task's LL: logistic loss of the head w on the mapped features plus (reg/2)||w||^2."""

    reg: float = eqx.field(static=True, default=0.01)

    def __call__(self, theta, w, batch):
        return _pair_logistic(theta, w, batch) + 0.5 * self.reg * w @ w


@dataclasses.dataclass(frozen=True)
class FmnistPairsOptions:
    """The keys of a `[problem] name = "fmnist_pairs"` table (see `fmnist_pairs`)."""

    samples: int = 256      # training samples per task and level
    dim: int = 32           # the shared map 784 -> dim
    reg: float = 0.1


def fmnist_pairs(**options) -> Workload:
    """Robust multi-task representation learning on Fashion-MNIST binary tasks (the MORBiT paper's
    class pairs `FMNIST_PAIRS`): a shared linear map 784 -> dim as theta, per-task logistic heads
    phi_i (ridge reg/2); `samples` training images per task and level (from a fixed draw), per seed
    the map's initialisation. Metrics: the maximum and mean test loss over the tasks at heads
    refitted on the LL samples (100 gradient steps). Needs `bj.datasets.fashion_mnist`'s IDX files."""
    o = options_of("fmnist_pairs", options)
    Xtr, ytr = bj.datasets.fashion_mnist(split="train")
    Xte, yte = bj.datasets.fashion_mnist(split="test")
    Xtr, Xte = Xtr.reshape(len(Xtr), -1) / 255.0, Xte.reshape(len(Xte), -1) / 255.0
    mean, rs = Xtr.mean(0), np.random.RandomState(0)
    up, lo, te = [], [], []
    n_test = min(int(np.sum((yte == a) | (yte == b))) for a, b in FMNIST_PAIRS)
    for a, b in FMNIST_PAIRS:
        idx = rs.permutation(np.nonzero((ytr == a) | (ytr == b))[0])[:2 * o.samples]
        tidx = np.nonzero((yte == a) | (yte == b))[0][:n_test]
        label = lambda y: np.where(y == a, 1.0, -1.0)   # noqa: E731
        up.append((Xtr[idx[:o.samples]] - mean, label(ytr[idx[:o.samples]])))
        lo.append((Xtr[idx[o.samples:]] - mean, label(ytr[idx[o.samples:]])))
        te.append((Xte[tidx] - mean, label(yte[tidx])))
    upper, lower, test = (tuple(jnp.asarray(np.stack([p[j] for p in parts]), _float_dtype()) for j in range(2))
                          for parts in (up, lo, te))
    n = len(FMNIST_PAIRS)
    problem = bj.MultiObjectiveProblem(_pair_logistic, PairLower(o.reg), num_tasks=n)

    @functools.lru_cache(maxsize=None)
    def for_seed(seed: int) -> Instance:
        theta0 = jax.random.normal(jax.random.PRNGKey(seed), (784, o.dim), _float_dtype()) / np.sqrt(784)
        return MultiTask(problem, (upper, lower), theta0, jnp.zeros((n, o.dim), _float_dtype()), test,
                         name="fmnist_pairs", description=f"Fashion-MNIST: {n} binary tasks, linear map 784->{o.dim}")

    def fitted_losses(theta, inst):
        def head(batch):   # the task's LL at the current map: 100 gradient steps (strongly convex)
            f = lambda w: PairLower(o.reg)(theta, w, batch)   # noqa: E731
            return jax.lax.fori_loop(0, 100, lambda _, w: w - jax.grad(f)(w), jnp.zeros(o.dim, theta.dtype))
        heads = jax.vmap(head)(inst.data[1])
        return jax.vmap(_pair_logistic, in_axes=(None, 0, 0))(theta, heads, inst.test)

    def make_eval(names, reference):
        fns = {"test_max": lambda s, inst: jnp.max(fitted_losses(s.theta, inst)),
               "test_mean": lambda s, inst: jnp.mean(fitted_losses(s.theta, inst))}
        return _select(fns, names)

    return Workload(for_seed(0), False, FMNIST_METRICS, dict, make_eval,
                    "test losses at heads refitted on the training samples", for_seed)


# --------------------------------------------------------------------------------------------------

PROBLEMS: Dict[str, Callable[..., Workload]] = {
    "quadratic": quadratic, "logreg_hpo": logreg_hpo, "lancbio_synthetic": lancbio_synthetic,
    "hyperclean": hyperclean, "sinusoid": sinusoid, "fmnist_pairs": fmnist_pairs}
OPTIONS: Dict[str, type] = {
    "quadratic": QuadraticOptions, "logreg_hpo": LogregOptions, "lancbio_synthetic": LancbioOptions,
    "hyperclean": HypercleanOptions, "sinusoid": SinusoidOptions, "fmnist_pairs": FmnistPairsOptions}
METRICS: Dict[str, Tuple[str, ...]] = {
    "quadratic": QUADRATIC_METRICS, "logreg_hpo": LOGREG_METRICS, "lancbio_synthetic": LANCBIO_METRICS,
    "hyperclean": HYPERCLEAN_METRICS, "sinusoid": SINUSOID_METRICS, "fmnist_pairs": FMNIST_METRICS}


def options_of(name: str, options: dict):
    """The options of problem `name` built from a table's keys; an unknown key is `UnknownKeys`
    listing the valid ones (the fields of the options dataclass)."""
    cls = OPTIONS[name]
    check_keywords(options, [f.name for f in dataclasses.fields(cls)], "[problem]", f"problem {name!r}")
    return cls(**options)


def _check_metrics(names, valid) -> None:
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; valid metrics: {', '.join(sorted(valid))}.")


def _select(fns: dict, names) -> Callable:
    _check_metrics(names, fns)
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
