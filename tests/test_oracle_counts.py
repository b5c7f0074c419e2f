"""The oracle counts every preset reports are the oracle calls its program makes.

The objectives are wrapped so that every use of them is a marked operation in the jaxpr of one
`update` (traced, not run):

- a value f(theta, phi, batch) carries a `value` mark on its output,
- a gradient pass carries a `grad` mark on (grad_theta f, grad_phi f) (one pass, both partials),
- a second-order product of f_lower carries a mark on its output: `hvp` on A u (the phi-block
  along a phi-direction), `cross` on J u and J^T d (the mixed blocks), `tt` on the theta-block.

The marks sit on oracle outputs, so after dead-code elimination of the step's outputs
(`StepInfo.residual_norm` excluded: the linear solvers' residual is a documented, uncounted
diagnostic) only the oracles the step uses remain; a vmapped mark counts its batch, a mark in a
`scan` body its trip count, and of a `cond` the branch the step takes (its predicate evaluated
from the state). The walk's totals must equal `StepInfo.oracles`, which the presets obtain from
the oracle functions (`bj.oracles.counting`), never from numbers written by hand.

Every preset of `bj.algorithms.ALGORITHMS` is checked at outer step 1 (the SARAH presets' refresh
steps count one pass over the data by convention, n / b minibatch oracles, which a count of calls
does not see; step 1 is a recursion step), with minibatches of 16 of 64 samples. The presets
tagged "constrained" are checked on the same problem with a constrained LL (a box; the KKT presets
also on an equality and on a theta-dependent halfspace). The multi-objective and min-max presets
(`MULTI_OBJECTIVE`, `MIN_MAX`) are checked on their quadratic problems, with one shared pair (tasks
vmapped) and with a list of pairs (tasks unrolled).
"""
import dataclasses
import math
from collections import Counter

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
import pytest
from jax._src import core
from jax._src.interpreters import ad, batching, mlir
from jax._src.interpreters import partial_eval as pe
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive

import bilevel_jax as bj

# ---------------------------------------------------------------------------------- the marks

mark_p = Primitive("oracle_mark")
mark_p.multiple_results = True
mark_p.def_impl(lambda *xs, **_: xs)
mark_p.def_abstract_eval(lambda *avals, **_: avals)
mlir.register_lowering(mark_p, mlir.lower_fun(lambda *xs, **_: xs, multiple_results=True))
batching.primitive_batchers[mark_p] = lambda xs, dims, **params: (mark_p.bind(*xs, **params), dims)
PRODUCTS = ("hvp", "cross", "tt")   # marks on linear maps of a direction


def _jvp(xs, ts, **params):
    """A value's or gradient's derivative is another oracle (marked by `marked`'s rules); a
    product's derivative along its direction is the product again (a dense solver's jacfwd)."""
    out = mark_p.bind(*xs, **params)
    if params["kind"] not in PRODUCTS or all(type(t) is ad.Zero for t in ts):
        return out, ts
    return out, mark_p.bind(*[ad.instantiate_zeros(t) for t in ts], **params)


ad.primitive_jvps[mark_p] = _jvp


def _transpose(cts, *xs, **params):
    if all(type(ct) is ad.Zero for ct in cts):
        return cts
    return mark_p.bind(*[ad.instantiate_zeros(ct) for ct in cts], **params)


ad.primitive_transposes[mark_p] = _transpose   # a mark on a linear value (a product) marks its transpose too


def _mark(tree, level, kind):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    shapes = tuple(tuple(jnp.shape(x)) for x in leaves)
    return jax.tree_util.tree_unflatten(treedef, mark_p.bind(*leaves, level=level, kind=kind, shapes=shapes))


def _is_zero(tree) -> bool:
    return all(isinstance(x, SymbolicZero) for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, SymbolicZero)))


def _dense(tree):
    return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, SymbolicZero) else x, tree,
                                  is_leaf=lambda x: isinstance(x, SymbolicZero))


def marked(f, level: str):
    """`f` with its values, gradient passes and second-order products marked (module docstring)."""
    grad = jax.grad(f, argnums=(0, 1))

    @jax.custom_jvp
    def value(theta, phi, batch):
        return _mark(f(theta, phi, batch), level, "value")

    @jax.custom_jvp
    def grads(theta, phi, batch):
        return _mark(grad(theta, phi, batch), level, "grad")

    def value_jvp(primals, tangents):
        theta, phi, batch = primals
        g_theta, g_phi = grads(theta, phi, batch)
        y = value(theta, phi, batch)
        dy = jnp.zeros_like(y)
        for g, t in ((g_theta, tangents[0]), (g_phi, tangents[1])):
            if not _is_zero(t):
                dy = dy + otu.tree_vdot(g, _dense(t))
        return y, dy

    def grads_jvp(primals, tangents):
        theta, phi, batch = primals
        g = grads(theta, phi, batch)
        dg = jax.tree_util.tree_map(jnp.zeros_like, g)
        if not _is_zero(tangents[0]):   # along theta: (H_tt u, H_pt u = J^T u)
            tt, pt = jax.jvp(lambda t: grad(t, phi, batch), (theta,), (_dense(tangents[0]),))[1]
            dg = otu.tree_add(dg, (_mark(tt, level, "tt"), _mark(pt, level, "cross")))
        if not _is_zero(tangents[1]):   # along phi: (H_tp u = J u, H_pp u = A u)
            tp, pp = jax.jvp(lambda p: grad(theta, p, batch), (phi,), (_dense(tangents[1]),))[1]
            dg = otu.tree_add(dg, (_mark(tp, level, "cross"), _mark(pp, level, "hvp")))
        return g, dg

    value.defjvp(value_jvp, symbolic_zeros=True)
    grads.defjvp(grads_jvp, symbolic_zeros=True)
    return value


def marked_problem(problem):
    return dataclasses.replace(problem, f_upper=marked(problem.f_upper, "upper"),
                               f_lower=marked(problem.f_lower, "lower"))


# ---------------------------------------------------------------------------------- the walk

FIELDS = {("lower", "grad"): "lower_grads", ("upper", "grad"): "upper_grads", ("lower", "hvp"): "hvps",
          ("lower", "cross"): "cross", ("lower", "value"): "values", ("upper", "value"): "values"}


def _multiplicity(eqn) -> int:
    """How many marked oracles one equation is: 1, or its batch when vmapped (the largest of its
    operands' batches: an output that does not depend on the vmapped input stays unbatched)."""
    return max(v.aval.size // max(math.prod(shape), 1) for v, shape in zip(eqn.invars, eqn.params["shapes"]))


class Concrete:
    """Concrete values of a jaxpr's variables: `inputs(indices)` gives those of its inputs, and only
    what a requested variable depends on is evaluated."""

    def __init__(self, jaxpr: core.Jaxpr, inputs):
        self.jaxpr, self.inputs = jaxpr, inputs

    def __call__(self, variables):
        j, used = pe.dce_jaxpr(self.jaxpr.replace(outvars=list(variables)), [True] * len(variables))
        return core.eval_jaxpr(j, [], *self.inputs([i for i, u in enumerate(used) if u]))

    def inner(self, sub: core.Jaxpr, consts, invars) -> "Concrete":
        """The evaluator of a sub-jaxpr (its constants, then the values of `invars` here)."""
        def inputs(indices):
            outer = [invars[i - len(consts)] for i in indices if i >= len(consts)]
            values = iter(self(outer) if outer else [])
            return [consts[i] if i < len(consts) else next(values) for i in indices]

        return Concrete(pe.convert_constvars_jaxpr(sub), inputs)


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for j in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(j, core.ClosedJaxpr):
                yield j.jaxpr, j.consts
            elif isinstance(j, core.Jaxpr):
                yield j, []


def walk(jaxpr: core.Jaxpr, concrete=None, scale=1) -> Counter:
    """The marked oracles of `jaxpr` (see the module docstring); `concrete` evaluates its variables
    (None inside loops, where they vary)."""
    counts = Counter()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if eqn.primitive is mark_p:
            counts[(eqn.params["level"], eqn.params["kind"])] += scale * _multiplicity(eqn)
        elif name == "scan":
            counts += walk(eqn.params["jaxpr"].jaxpr, None, scale * eqn.params["length"])
        elif name == "cond":
            branches = [walk(b.jaxpr, None, scale) for b in eqn.params["branches"]]
            if all(b == branches[0] for b in branches):
                counts += branches[0]
                continue
            assert concrete is not None, f"a cond whose branches differ in oracles inside a loop: {branches}"
            taken = eqn.params["branches"][int(concrete([eqn.invars[0]])[0])]
            counts += walk(taken.jaxpr, concrete.inner(taken.jaxpr, taken.consts, eqn.invars[1:]), scale)
        elif name == "while":
            for sub, _ in _subjaxprs(eqn):
                assert not walk(sub), "oracles in a while loop: no static trip count"
        else:
            for sub, consts in _subjaxprs(eqn):
                same_inputs = concrete is not None and len(sub.invars) == len(eqn.invars)
                counts += walk(sub, concrete.inner(sub, consts, eqn.invars) if same_inputs else None, scale)
    return counts


def traced_and_reported(alg, init, data):
    """(the marked oracles of one `alg.update` from the state `init()`, its reported `OracleCounts`).

    The state is traced too, not computed: of `init`'s jaxpr only what the walk reads (the
    reported counts, the predicates of conds) is evaluated, not every operation of `alg.init`
    (an eager program each)."""
    def step(state, data):
        new, info = alg.update(state, data)
        return new, info.oracles, info.status

    init_closed, state = jax.make_jaxpr(init, return_shape=True)()
    state_values = Concrete(pe.convert_constvars_jaxpr(init_closed.jaxpr),
                            lambda indices: [init_closed.consts[i] for i in indices])
    closed, shapes = jax.make_jaxpr(step, return_shape=True)(state, data)
    jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
    # the step's inputs: its constants, the state (init's outputs, evaluated on demand), the data
    args = [*closed.consts, *init_closed.jaxpr.outvars, *jax.tree_util.tree_leaves(data)]
    n_consts, n_state_in = len(closed.consts), len(init_closed.jaxpr.outvars)
    is_state = [n_consts <= i < n_consts + n_state_in for i in range(len(args))]
    jaxpr, used = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    args, is_state = [a for a, u in zip(args, used) if u], [t for t, u in zip(is_state, used) if u]

    evaluated = {}   # state leaves evaluated so far (each cond's predicate asks again)

    def inputs(indices):
        missing = [i for i in indices if is_state[i] and i not in evaluated]
        evaluated.update(zip(missing, state_values([args[i] for i in missing])))
        return [evaluated[i] if is_state[i] else args[i] for i in indices]

    n_state = len(jax.tree_util.tree_leaves(shapes[0]))
    concrete = Concrete(jaxpr, inputs)
    reported = bj.oracles.OracleCounts(*(int(c) for c in concrete(jaxpr.outvars[n_state:n_state + 5])))
    marks = walk(jaxpr, concrete)
    unknown = set(marks) - set(FIELDS)
    assert not unknown, f"oracles no count has a field for: {unknown}"
    traced = dict.fromkeys(bj.oracles.OracleCounts._fields, 0)
    for key, n in marks.items():
        traced[FIELDS[key]] += n
    return bj.oracles.OracleCounts(**traced), reported


# ---------------------------------------------------------------------------------- the presets

@pytest.fixture(scope="module")
def problem(quad_stoch):
    return quad_stoch._replace(problem=marked_problem(quad_stoch.problem))


def _at_step(state, count):
    head = state.header
    return eqx.tree_at(lambda s: s.header, state, head._replace(count=jnp.asarray(count, head.count.dtype)))


@pytest.mark.parametrize("name", sorted(bj.algorithms.ALGORITHMS))
def test_reported_counts_are_the_traced_oracle_calls(name, problem):
    alg = bj.algorithms.get(name)(problem.problem, upper_lr=0.1, batch_size=16)   # a step size: no defaults wrapper
    init = lambda: _at_step(alg.init(problem.theta0, problem.phi0, jax.random.PRNGKey(0), problem.data), 1)
    traced, reported = traced_and_reported(alg, init, problem.data)
    assert traced == reported, (name, traced, reported)


# ---------------------------------------------------------------------------------- constrained lower levels

@pytest.fixture(scope="module")
def constraint_sets():
    """Inequalities (active ones after the LL steps), an equality, a bound that moves with theta
    (built on first use, not at collection in every xdist worker: 27 eager programs)."""
    a = np.ones(6) / np.sqrt(6.0)
    return {"box": bj.constraints.box(-0.1, 0.1), "hyperplane": bj.constraints.hyperplane(a, 0.2),
            "moving_halfspace": bj.constraints.halfspace(a, lambda theta: -0.3 + 0.1 * jnp.sum(theta))}


KKT_PRESETS = ("aid_bio", "amigo", "bsg_constrained", "soba")   # the KKT adjoint: every set, theta-dependent too


@pytest.mark.parametrize("where, name", [("box", n) for n in bj.algorithms.presets_with("constrained")]
                         + [(w, n) for w in ("hyperplane", "moving_halfspace") for n in KKT_PRESETS])
def test_constrained_counts_are_the_traced_oracle_calls(where, name, quad_stoch, constraint_sets):
    """The constrained presets on the stochastic quadratic with a constrained LL: the KKT rules'
    Lagrangian products count as f_lower's (one HVP per KKT matvec, one cross product for the
    correction, one LL gradient for the multipliers, the active set and the LL direction), the
    constraints' derivatives not at all (`bj.oracles.OracleCounts`)."""
    q = quad_stoch
    problem = marked_problem(constraint_sets[where].problem(q.problem.f_upper, q.problem.f_lower))
    alg = bj.algorithms.get(name)(problem, upper_lr=0.1, batch_size=16)
    init = lambda: _at_step(alg.init(q.theta0, jnp.zeros(6), jax.random.PRNGKey(0), q.data), 1)
    traced, reported = traced_and_reported(alg, init, q.data)
    assert traced == reported, (name, where, traced, reported)
    if name == "aid_bio":   # T = 10 LL steps, warm-started minres(10): 10 + 1 matvecs
        assert tuple(int(c) for c in reported) == (10 + 1, 1, 10 + 1, 1, 0), reported


# ---------------------------------------------------------------------------------- multi-objective and min-max presets

TASK_VARIANTS = {"morbit": ({}, {"lower_steps": 2, "dual_reg": 0.1}, {"uniform": True}),
                 "mmb": ({}, {"blocks": 2, "linear_solver": bj.linear_solvers.cg(3, warm_start=True)})}


def marked_tasks(problem, listed: bool):
    """A `MultiObjectiveProblem` or `MinMaxBilevelProblem` with its objectives marked, as one shared
    pair (tasks vmapped) or as a list of equal pairs (tasks unrolled)."""
    if isinstance(problem, bj.MinMaxBilevelProblem):   # f_i(theta, y_i, phi, batch): (theta, y_i) is one UL variable
        joint = marked(lambda x, phi, batch: problem.f_upper(*x, phi, batch), "upper")
        f_upper, n = (lambda theta, y, phi, batch: joint((theta, y), phi, batch)), problem.num_blocks
    else:
        f_upper, n = marked(problem.f_upper, "upper"), problem.num_tasks
    f_lower = marked(problem.f_lower, "lower")
    return type(problem)([f_upper] * n, [f_lower] * n) if listed else dataclasses.replace(
        problem, f_upper=f_upper, f_lower=f_lower)


@pytest.mark.parametrize("listed", [False, True], ids=["shared", "listed"])
@pytest.mark.parametrize("name", sorted({**bj.algorithms.MULTI_OBJECTIVE, **bj.algorithms.MIN_MAX}))
def test_multi_objective_and_min_max_counts_are_the_traced_oracle_calls(name, listed):
    """Per-task oracles: vmapped over the n tasks (or the B sampled blocks), or unrolled for lists."""
    from bilevel_jax.problems import multitask as mt
    if name in bj.algorithms.MIN_MAX:
        q = mt.min_max_quadratic(0, num_blocks=3, dim_upper=2, dim_dual=2, dim_lower=3)
        init = lambda alg: alg.init(jnp.zeros(2), jnp.zeros((3, 3)), jax.random.PRNGKey(0), q.data,
                                    y0=jnp.zeros((3, 2)))
    else:
        q = mt.multitask_quadratic(0, num_tasks=3, dim_upper=2, dim_lower=3)
        init = lambda alg: alg.init(jnp.zeros(2), jnp.zeros((3, 3)), jax.random.PRNGKey(0), q.data)
    problem = marked_tasks(q.problem, listed)
    for kw in TASK_VARIANTS[name]:
        alg = bj.algorithms.get(name)(problem, upper_lr=0.1, **kw)
        traced, reported = traced_and_reported(alg, lambda: _at_step(init(alg), 1), q.data)
        assert traced == reported, (name, kw, traced, reported)


# ---------------------------------------------------------------------------------- the marks themselves

def test_marks_count_values_gradients_and_products_of_a_known_program(quad):
    """The walk on programs whose oracle calls are known: a value, a gradient pass, a linearization
    with two HVPs (a CG-like loop of 3 of them) and a cross product, a vmapped gradient."""
    p = marked_problem(quad.problem)
    theta, phi, (up, low) = quad.theta0, quad.phi0, quad.data

    def program(theta, phi):
        value = p.f_upper(theta, phi, up)
        g_theta, g_phi = bj.oracles.upper_grads(p, theta, phi, up)
        lin = bj.oracles.linearize_lower(p, theta, phi, low)
        v = jax.lax.fori_loop(0, 3, lambda _, v: v - 0.1 * lin.hvp(v), g_phi)
        many = jax.vmap(lambda t: bj.oracles.lower_grad_phi(p, t, phi, low))(jnp.stack([theta] * 5))
        return value, g_theta - lin.cross(v), many, lin.hvp(v)

    closed = jax.make_jaxpr(program)(theta, phi)
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * 4)
    assert walk(jaxpr) == Counter({("upper", "value"): 1, ("upper", "grad"): 1, ("lower", "hvp"): 4,
                                   ("lower", "cross"): 1, ("lower", "grad"): 5})
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [False, True, False, False])   # unused oracles are not counted
    assert walk(jaxpr) == Counter({("upper", "grad"): 1, ("lower", "hvp"): 3, ("lower", "cross"): 1})
