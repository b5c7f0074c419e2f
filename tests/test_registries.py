"""The registries against what their tags claim.

Solvers x operators: the example instance of every entry of `bj.linear_solvers.REGISTRY` on four
operators of dimension 6 (SPD, symmetric indefinite and singular with |eigenvalues| in
[0.5, 1.5] or 0, and the SPD one with a NaN entry), with a right-hand side of two pytree leaves.
Every solve holds the NaN-iff-status rule (`bj.linear_solvers.base`): every leaf of x and of the
state's x is NaN exactly when the status is not OK, and the residual is NaN then. What the tags
claim is solved to 1e-8 relative against NumPy's dense solve: SPD systems by all, indefinite ones
by "indefinite" solvers, after REPEATS solves of the one system for "stateful" solvers, and as the
mean of the distinct draws over KEYS keys for "stochastic" ones (with a deterministic operator the
HIA's draws N eta (I - eta A)^p b, p = 0..N-1, average to the truncated series). A deterministic
solver fails (NONFINITE) on the NaN operator. One jit per solver, the operators and keys vmapped.

Presets x problems: every preset of `bj.algorithms.CAPABILITIES` on every registered problem that
needs a capability (a box-constrained LL, the pessimistic problem, a multi-objective and a min-max
one; the plain strongly convex quadratic, which every single-problem preset takes, is the
convergence tests'): accepted exactly when its tags allow, with one finite step that keeps phi
feasible, else refused at construction with the tagged presets named. "hessian_free" steps call no
HVP or cross product; "stochastic_analysis" is the default minibatch of 64. The README's tag tables
are rendered from both registries.
"""
import functools
import inspect
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import bilevel_jax as bj
from bilevel_jax.problems import multitask
from tests.test_algorithms_convergence import DETERMINISTIC

ls = bj.linear_solvers
st = bj.status

N = 6
REPEATS = 60   # solves of one system by a stateful solver
KEYS = 1024    # draws of a stochastic solver: all N = 40 truncations of the HIA appear (missed: p < 1e-9)


def _operators():
    """(names, operators (4, N, N), b (N,)): eigenvalues linspace(0.5, 1.5) with alternating
    signs (indefinite), the smallest set to 0 (singular: b is not in the range), a NaN entry."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(N, N)))
    eig = np.linspace(0.5, 1.5, N)
    sym = lambda d: (q * d) @ q.T
    nan = sym(eig)
    nan[0, 0] = np.nan
    ops = {"spd": sym(eig), "indefinite": sym(eig * (-1.0) ** np.arange(N)), "singular": sym(np.where(eig == eig.min(), 0.0, eig)),
           "nan": nan}
    return list(ops), np.stack(list(ops.values())), rng.normal(size=N)


NAMES, OPERATORS, B = _operators()


def _solves(solver, keys: int, repeats: int):
    """x, the state's x (pytrees) and the SolverInfo of every solve, each leaf with leading axes
    (operator, key, repeat): per operator and key, `repeats` solves of A x = b in a scan."""

    @jax.jit
    def run(ops, b):
        _, unravel = ravel_pytree({"u": jnp.zeros(4), "w": jnp.zeros((2, 1))})   # (traced: no eager program)
        tree = unravel(b)

        def one(a, key):
            matvec = lambda x, *key_arg: unravel(a @ ravel_pytree(x)[0])

            def step(state, i):
                x, state, info = solver.solve(matvec, tree, state, key=jax.random.fold_in(key, i))
                return state, (x, state.x, info)

            return jax.lax.scan(step, solver.init(tree), jnp.arange(repeats))[1]

        over_keys = jax.vmap(one, in_axes=(None, 0))
        return jax.vmap(over_keys, in_axes=(0, None))(ops, jax.random.split(jax.random.PRNGKey(0), keys))

    return run(OPERATORS, B)


def _flat(tree):
    """Leaves reshaped to (operator, key, repeat, size), one array per leaf."""
    return [np.asarray(leaf).reshape(leaf.shape[:3] + (-1,)) for leaf in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("name", sorted(ls.REGISTRY))
def test_registered_solver_on_each_operator_holds_nan_iff_status_and_its_tags(name):
    entry = ls.REGISTRY[name]
    solver = entry.example()
    stochastic, stateful = "stochastic" in entry.tags, "stateful" in entry.tags
    assert isinstance(solver, ls.LinearSolver) and solver.stochastic == stochastic
    assert len(entry.tags & {"spd_only", "indefinite"}) == 1, entry.tags
    x, state_x, info = _solves(solver, KEYS if stochastic else 1, REPEATS if stateful else 1)
    status = np.asarray(info.status)
    failed = status != st.OK
    for leaf in _flat(x) + _flat(state_x):   # NaN in every leaf exactly when the status is not OK
        assert np.array_equal(np.isnan(leaf).all(-1), failed), (name, status)
        assert np.all(np.isfinite(leaf).all(-1) | failed), name
    assert np.all(np.isnan(np.asarray(info.residual_norm))[failed]), name

    claims = ["spd"] + (["indefinite"] if "indefinite" in entry.tags else [])
    x_last = np.concatenate(_flat(x), -1)[:, :, -1]
    for op in claims:
        i = NAMES.index(op)
        assert not failed[i].any(), (name, op, [st.describe(s) for s in status[i, :, -1]])
        draws = np.unique(x_last[i], axis=0)   # one row unless stochastic
        rel = np.linalg.norm(draws.mean(0) - np.linalg.solve(OPERATORS[i], B)) / np.linalg.norm(B)
        assert rel < 1e-8, (name, op, rel)
    if not stochastic:   # the NaN reaches every deterministic solve
        nan = status[NAMES.index("nan")]
        assert np.all(nan & st.NONFINITE), (name, [st.describe(s) for s in nan.ravel()])


# ------------------------------------------------------------------------ presets x problems
ALG = bj.algorithms
KINDS = {"multi_objective", "min_max"}   # tags of presets that take another problem class only
STEPS = dict(upper_lr=0.1, lower_lr=0.1)   # explicit steps (those a preset takes): no estimation at init


# the registered test problems (`_problems`) and the capability tags a preset must have to accept each
NEEDS = {"constrained": frozenset({"constrained"}), "pessimistic": frozenset({"constrained", "pessimistic"}),
         "multi_objective": frozenset({"multi_objective"}), "min_max": frozenset({"min_max"})}


class ProblemCase(NamedTuple):
    """A registered test problem: `feasible(phi)` whether phi is in the LL's feasible set (None:
    unconstrained); `refusal` what the error of a single-problem preset that does not accept it
    says (a regex; a preset for another problem class refuses the class)."""

    problem: Any
    theta0: Any
    phi0: Any
    data: Any
    init_kw: dict
    feasible: Optional[Callable]
    refusal: str


@functools.cache
def _problems():
    """The problems of NEEDS, built when a test first needs them (not at collection, which every
    xdist worker repeats); starting points in NumPy (no eager program per shape)."""
    box = bj.constraints.box(0.0, 1.0)   # the LL's unconstrained minimiser 3 + theta is outside: steps must project
    boxed = box.problem(lambda t, p, b: 0.5 * jnp.sum((p - 0.5) ** 2) + 0.5 * jnp.sum(t ** 2),
                        lambda t, p, b: 0.5 * jnp.sum((p - 3.0 - t) ** 2))
    segment = bj.constraints.box(np.array([-10.0, 0.0]), np.array([10.0, 1.0]))   # the README's pessimistic HPO
    pessimistic = segment.problem(lambda t, p, b: 0.5 * (p[0] - 1) ** 2 + 0.5 * p[1] * p[0] + 0.5 * t[0] ** 2,
                                  lambda t, p, b: 0.5 * (p[0] - t[0]) ** 2, pessimistic=True)
    within = lambda s: (lambda p: bool(np.all((np.asarray(p) >= np.asarray(s.lower) - 1e-12)
                                              & (np.asarray(p) <= np.asarray(s.upper) + 1e-12))))
    mo = multitask.multitask_quadratic(0, num_tasks=3, dim_upper=2, dim_lower=3)
    mm = multitask.min_max_quadratic(0)
    return {
        "constrained": ProblemCase(boxed, np.zeros(3), np.full(3, 0.5), (None, None), {}, within(box),
                                   "lower level is constrained"),
        "pessimistic": ProblemCase(pessimistic, np.zeros(1), np.array([0.0, 0.5]), (None, None), {}, within(segment),
                                   "lower level is constrained|the problem is pessimistic"),
        "multi_objective": ProblemCase(mo.problem, np.zeros(2), np.zeros((3, 3)), mo.data, {}, None, ""),
        "min_max": ProblemCase(mm.problem, np.zeros(2), np.zeros((3, 3)), mm.data, {"y0": np.zeros((3, 2))}, None, ""),
    }


def _build(name, problem, **kw):
    preset = ALG.get(name)
    params = inspect.signature(preset).parameters
    return preset(problem, batch_size=None, **{k: v for k, v in STEPS.items() if k in params}, **kw)


@eqx.filter_jit
def _one_step(alg, q: ProblemCase):
    """`alg.init` and one `alg.update`, in one program."""
    state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data, **q.init_kw)
    return alg.update(state, q.data)


def test_capabilities_name_every_preset_with_known_tags():
    assert set(ALG.CAPABILITIES) == {*ALG.ALGORITHMS, *ALG.MULTI_OBJECTIVE, *ALG.MIN_MAX, "pessimistic_penalty",
                                     "bsg_constrained"}
    for name, tags in ALG.CAPABILITIES.items():
        assert tags <= set(ALG.TAGS), name
        assert ALG.get(name) is getattr(ALG, name)
        assert len(tags & KINDS) <= 1, name


def _accepts(name, needs: frozenset) -> bool:
    tags = ALG.CAPABILITIES[name]
    return needs <= tags and tags & KINDS <= needs


def _check_step(name, q: ProblemCase):
    """One step: finite, phi feasible, and no HVP or cross product when tagged hessian_free."""
    state, info = _one_step(_build(name, q.problem), q)
    assert int(info.status) & (st.NONFINITE | st.BREAKDOWN) == 0, st.describe(info.status)
    assert q.feasible is None or q.feasible(state.phi), (name, state.phi)
    if "hessian_free" in ALG.CAPABILITIES[name]:
        assert (int(info.oracles.hvps), int(info.oracles.cross)) == (0, 0), name
        assert int(info.oracles.lower_grads) > 0, name


@pytest.mark.parametrize("name", sorted(ALG.CAPABILITIES))
@pytest.mark.parametrize("problem", sorted(NEEDS))
def test_preset_accepts_exactly_the_registered_problems_its_tags_allow(problem, name):
    """Accepted: one step (`_check_step`). Refused: at construction, naming the preset, and a
    constrained or pessimistic problem's refusal names the presets tagged for it."""
    q, needs = _problems()[problem], NEEDS[problem]
    if _accepts(name, needs):
        _check_step(name, q)
        return
    kind = ALG.CAPABILITIES[name] & KINDS != needs & KINDS   # another problem class
    reason = r"problem must be a bj\." if kind else q.refusal
    with pytest.raises((ValueError, TypeError), match=f"^{name}: .*({reason})") as refusal:
        _build(name, q.problem)
    message = str(refusal.value)
    if "lower level is constrained" in message:
        assert ", ".join(ALG.presets_with("constrained")) in message
    if "the problem is pessimistic" in message:
        assert all(f"bj.algorithms.{p}" in message for p in ALG.presets_with("pessimistic"))


@pytest.mark.parametrize("name", [n for n in ALG.presets_with("hessian_free")
                                  if not any(_accepts(n, needs) for needs in NEEDS.values())])
def test_a_hessian_free_step_calls_no_hvp_and_no_cross_product(quad, name):
    """The hessian_free presets no registered problem runs (above), on the plain quadratic."""
    _check_step(name, ProblemCase(quad.problem, quad.theta0, quad.phi0, quad.data, {}, None, ""))


def test_a_preset_without_second_order_oracles_is_tagged_hessian_free_or_drops_the_implicit_gradient(quad):
    """The convergence tests' per-step counts (LL, UL gradients, HVPs, cross products) of the
    presets not tagged hessian_free: a step without HVP and cross product is a partial gradient."""
    for name, (_, kw, per_step) in DETERMINISTIC.items():
        assert "hessian_free" not in ALG.CAPABILITIES[name]
        if per_step[2] == per_step[3] == 0:
            assert isinstance(ALG.get(name)(quad.problem, **kw).direction, ALG.directions.Partial), name


@pytest.mark.parametrize("name", sorted(ALG.CAPABILITIES))
def test_stochastic_analysis_is_the_default_minibatch(name):
    default = inspect.signature(ALG.get(name)).parameters["batch_size"].default
    assert default == (64 if "stochastic_analysis" in ALG.CAPABILITIES[name] else None), (name, default)


# ------------------------------------------------------------------------------- the README
def _table(tags: dict, members: dict, what: str) -> str:
    """The README's markdown table of `tags` (name -> meaning) and who has each."""
    rows = [f"| tag | meaning | {what} |", "|---|---|---|"]
    rows += [f"| `{tag}` | {meaning} | {', '.join(f'`{n}`' for n in sorted(members) if tag in members[n])} |"
             for tag, meaning in tags.items()]
    return "\n".join(rows)


@pytest.mark.parametrize("which", ["solvers", "presets"])
def test_readme_tables_are_the_registries(which):
    tags, members = ((ls.TAGS, {n: e.tags for n, e in ls.REGISTRY.items()}) if which == "solvers"
                     else (ALG.TAGS, ALG.CAPABILITIES))
    expected = _table(tags, members, which)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert expected in readme, f"README.md needs this table (generated from the registry):\n\n{expected}\n"
    rest = readme.replace(expected, "")
    for name in members:   # and every registered name is documented outside the table too
        assert f"`{name}`" in rest, name
