"""What each preset of `bj.algorithms` can do: `CAPABILITIES[name]`, a frozenset of `TAGS`.

The one statement of it: the refusals of a constrained or pessimistic problem name the presets
tagged for it (`Algorithm`, `bj.problem.check_optimistic`), `bj.algorithms.get` finds every preset
named here, and the README's capability table and the tests are read from or checked against it
(`tests/test_registries.py` builds every preset on the registered test problems: it must accept
exactly the problems its tags allow, stay on a constrained LL's feasible set, and a "hessian_free"
step calls no HVP or cross product). The tags state what a preset's builder does; its algorithm's
own checks (`Algorithm.handles_constraints`, `handles_pessimistic`) enforce it per instance.

No imports: `Algorithm` (base.py) reads it while the presets are being defined.
"""
from __future__ import annotations

TAGS = {
    "hessian_free": "no Hessian-vector or cross product: gradients (and function values) only",
    "constrained": "accepts a constrained LL (lower_inequality / lower_equality) and keeps phi feasible",
    "pessimistic": "solves the pessimistic problem (BilevelProblem(..., pessimistic=True))",
    "multi_objective": "takes a bj.MultiObjectiveProblem (n objective pairs, robust weights)",
    "min_max": "takes a bj.MinMaxBilevelProblem (m min-max blocks)",
    "stochastic_analysis": "its paper analyses minibatches: default batch_size=64 (others: the full batch)",
    "reformulation": "solves a single-level reformulation (value-function or optimality penalty, barrier, "
                     "constraint dissolving): its fixed point approaches theta* as the penalty grows",
}


def _tags(*names: str) -> frozenset:
    unknown = set(names) - set(TAGS)
    if unknown:
        raise ValueError(f"unknown capability tags {sorted(unknown)}; valid: {sorted(TAGS)}.")
    return frozenset(names)


_SA = "stochastic_analysis"
_VF = ("hessian_free", "constrained", "reformulation")   # the projected value-function presets

CAPABILITIES = {
    # implicit gradient, double loop
    "alternating": _tags(), "signsgd_ul": _tags(), "ba": _tags(), "bsa": _tags(_SA),
    "aid_bio": _tags("constrained"), "stocbio": _tags(_SA), "amigo": _tags("constrained", _SA),
    "lancbio": _tags(), "subbio": _tags(),
    # single loop
    "ttsa": _tags(_SA), "alset": _tags(_SA), "stable": _tags(_SA), "soba": _tags("constrained", _SA),
    "saba": _tags(_SA), "srba": _tags(_SA), "fsla": _tags(_SA), "mrbo": _tags(_SA), "sustain": _tags(_SA),
    "momentum": _tags(_SA), "vrbo": _tags(_SA), "vrbo_single_loop": _tags(_SA),
    # Hessian-free hypergradients
    "hjfbio": _tags("hessian_free", _SA), "bsg1": _tags("hessian_free", _SA),
    "pzobo": _tags("hessian_free", "constrained"),
    # value function and penalties
    "f2sa": _tags(*_VF, _SA), "bome": _tags(*_VF), "pbgd": _tags(*_VF), "pdbo": _tags(*_VF),
    "vf_penalty": _tags(*_VF), "smoothing_pg": _tags(*_VF),
    "optimality_penalty": _tags("reformulation"), "cdb": _tags("reformulation"),
    "ebsa": _tags("constrained", "reformulation"),
    # outside ALGORITHMS: problems other than a strongly convex, unconstrained, optimistic LL
    "bsg_constrained": _tags("constrained"),
    "pessimistic_penalty": _tags("pessimistic", *_VF),
    "morbit": _tags("multi_objective"),
    "mmb": _tags("min_max"),
}


def presets_with(tag: str) -> tuple:
    """The names of the presets tagged `tag`, sorted."""
    if tag not in TAGS:
        raise ValueError(f"unknown capability tag {tag!r}; valid: {sorted(TAGS)}.")
    return tuple(sorted(name for name, tags in CAPABILITIES.items() if tag in tags))


__all__ = ["CAPABILITIES", "TAGS", "presets_with"]
