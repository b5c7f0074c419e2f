"""Concrete bilevel problems; those with closed forms are the ground truth of the tests."""
from bilevel_jax.problems.lancbio_synthetic import LancBiOSynthetic, lancbio_synthetic
from bilevel_jax.problems.flat import FlatBilevel, flat_bilevel
from bilevel_jax.problems.logistic import LOGISTIC, LogisticHPO, ValueSolution, logistic_hpo
from bilevel_jax.problems.quadratic import QuadraticBilevel, quadratic_bilevel
from bilevel_jax.problems.ridge import RIDGE, RidgeHPO, ridge_hpo

__all__ = [
    "FlatBilevel", "flat_bilevel",
    "LancBiOSynthetic", "lancbio_synthetic",
    "LOGISTIC", "LogisticHPO", "ValueSolution", "logistic_hpo",
    "QuadraticBilevel", "quadratic_bilevel", "RIDGE", "RidgeHPO", "ridge_hpo",
]
