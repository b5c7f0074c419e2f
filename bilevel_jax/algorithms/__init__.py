"""Bilevel algorithms: `Algorithm(init, update)` pairs built from one generic loop.

Presets (paper defaults in each docstring): alternating, ba, bsa, aid_bio, stocbio, amigo, ttsa,
stable, alset, soba, saba, srba, mrbo, sustain, vrbo (double loop), vrbo_single_loop, fsla, signsgd_ul, momentum, lancbio, subbio;
Hessian-free / value-function: f2sa, bome, pbgd, pdbo, vf_penalty, pzobo, hjfbio, bsg1.
Reformulations: smoothing_pg (value function), optimality_penalty, cdb and ebsa (grad_y g = 0).
Multi-objective (robust, n objective pairs; a `bj.MultiObjectiveProblem`, registry `MULTI_OBJECTIVE`): morbit.
Multi-block min-max bilevel (a `bj.MinMaxBilevelProblem`, registry `MIN_MAX`): mmb.
Building blocks: `bilevel_loop`, `directions`, `estimators`, and the step primitives of `steps`.
What each preset can do (Hessian-free, constrained, pessimistic, ...): `CAPABILITIES` (`capabilities`).
"""
import difflib

from bilevel_jax.algorithms.parallel import DataParallel, data_parallel, preset_options, shard

from bilevel_jax.algorithms import directions, estimators, steps
# the options a preset's `**kw` passes on to its loop (what a preset takes beyond its named arguments)
from bilevel_jax.algorithms._common import LOOP_OPTIONS
from bilevel_jax.algorithms.base import Algorithm, Header, OracleCounts, State, StepInfo
from bilevel_jax.algorithms.capabilities import CAPABILITIES, TAGS, presets_with
from bilevel_jax.algorithms.double_loop import aid_bio, alternating, amigo, ba, bsa, signsgd_ul, stocbio
from bilevel_jax.algorithms.krylov import lancbio, subbio
from bilevel_jax.algorithms.loop import BilevelLoop, LoopState, bilevel_loop
from bilevel_jax.algorithms.momentum import momentum, mrbo, sustain, vrbo, vrbo_single_loop
from bilevel_jax.algorithms.mmb import MIN_MAX, MMB, mmb
from bilevel_jax.algorithms.morbit import MULTI_OBJECTIVE, Morbit, morbit
from bilevel_jax.algorithms.fsla import FSLA, FslaState, fsla
from bilevel_jax.algorithms.single_loop import alset, saba, soba, srba, ttsa
from bilevel_jax.algorithms.stable import Stable, StableState, stable
from bilevel_jax.algorithms import value_function
from bilevel_jax.algorithms.bsg import bsg1
from bilevel_jax.algorithms.cdb import CDB, CDBState, cdb
from bilevel_jax.algorithms.finite_difference import hjfbio
from bilevel_jax.algorithms.penalty import ebsa, f2sa, optimality_penalty, pbgd
from bilevel_jax.algorithms.value_function import bome, pdbo, smoothing_pg, vf_penalty
from bilevel_jax.algorithms.zeroth_order import pzobo
# the pessimistic problem (needs a LL with many solutions; not in ALGORITHMS: the all-preset tests assume a
# strongly convex LL and the optimistic reading)
from bilevel_jax.algorithms.pessimistic import PessimisticPenalty, PessimisticState, pessimistic_penalty
# constrained LLs (need lower_inequality / lower_equality and a feasible set: not in ALGORITHMS either)
from bilevel_jax.algorithms.constrained import KKT, AmortizedKKT, amortized_kkt, bsg_constrained, kkt
# defaults that converge: a preset called without step sizes runs on the problem rescaled at init
from bilevel_jax.algorithms import defaults
from bilevel_jax.algorithms.vocabulary import accepts_renamed

ALGORITHMS = {
    "alternating": alternating, "ba": ba, "bsa": bsa, "aid_bio": aid_bio, "stocbio": stocbio, "amigo": amigo,
    "ttsa": ttsa, "stable": stable, "alset": alset, "soba": soba, "saba": saba, "srba": srba, "mrbo": mrbo,
    "sustain": sustain, "vrbo": vrbo, "vrbo_single_loop": vrbo_single_loop, "fsla": fsla, "signsgd_ul": signsgd_ul, "momentum": momentum,
    "lancbio": lancbio, "subbio": subbio,
    # Hessian-free and value-function methods (valid for LLs with many minima: bome, pdbo, vf_penalty, pbgd)
    "f2sa": f2sa, "bome": bome, "pbgd": pbgd, "pdbo": pdbo, "vf_penalty": vf_penalty, "pzobo": pzobo,
    "hjfbio": hjfbio, "bsg1": bsg1,
    # reformulations: value function (smoothing_pg), optimality conditions grad_y g = 0 (optimality_penalty)
    "smoothing_pg": smoothing_pg, "optimality_penalty": optimality_penalty,
    # constraint dissolving (grad_y g = 0 dissolved; non-smooth UL)
    "cdb": cdb,
    # barrier-smoothed LL (inequality constraints, non-convex LL) + augmented Lagrangian on its stationarity
    "ebsa": ebsa,
}


# every preset (and bilevel_loop) also takes mesh= / shards= (data-parallel runs, `parallel.data_parallel`)
# the augmented-Lagrangian reformulations keep their own tested defaults, checked at init against L_g
_OWN_DEFAULTS = ("optimality_penalty", "cdb", "ebsa")
for _name in (*ALGORITHMS, "bilevel_loop", "pessimistic_penalty", "bsg_constrained"):
    if _name in ALGORITHMS:
        _wrap = defaults.own_defaults if _name in _OWN_DEFAULTS else defaults.auto_scaled
        globals()[_name] = _wrap(globals()[_name])
    globals()[_name] = preset_options(globals()[_name])
    if _name in ALGORITHMS:
        ALGORITHMS[_name] = globals()[_name]
del _name, _wrap
# the multi-objective and min-max presets take no data-parallel options, but their renamed keywords
for _name, _registry in (("morbit", MULTI_OBJECTIVE), ("mmb", MIN_MAX)):
    globals()[_name] = _registry[_name] = accepts_renamed(globals()[_name])
del _name, _registry


def get(name: str):
    """The preset called `name`: any of `CAPABILITIES` (the single-problem presets of `ALGORITHMS`,
    `pessimistic_penalty`, `bsg_constrained`, the multi-objective ones of `MULTI_OBJECTIVE`, which take
    a `bj.MultiObjectiveProblem`, and the min-max ones of `MIN_MAX`, which take a
    `bj.MinMaxBilevelProblem`); an unknown name lists the valid ones."""
    if name not in CAPABILITIES:
        close = difflib.get_close_matches(name, CAPABILITIES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown algorithm {name!r}.{hint} Valid names: {', '.join(sorted(CAPABILITIES))}.")
    return globals()[name]


__all__ = ["DataParallel", "data_parallel", "shard", "ALGORITHMS", "LOOP_OPTIONS", "CAPABILITIES", "TAGS", "presets_with", "MIN_MAX", "MULTI_OBJECTIVE", "MMB", "Morbit", "mmb", "morbit", "Algorithm", "BilevelLoop", "FSLA", "FslaState", "Header", "LoopState", "OracleCounts", "Stable", "StableState",
           "State", "StepInfo",
           "CDB", "CDBState", "bilevel_loop", "directions", "estimators", "get", "steps", "value_function",
           "PessimisticPenalty", "PessimisticState", "pessimistic_penalty", "KKT", "AmortizedKKT", "amortized_kkt",
           "bsg_constrained", "kkt", *sorted(ALGORITHMS)]
