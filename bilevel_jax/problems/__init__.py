"""Concrete bilevel problems, each built as an `Instance` (problem, data, start, reference); those with
closed forms are the ground truth of the tests."""
from bilevel_jax.problems.instance import Instance, Reference
from bilevel_jax.problems.lancbio_synthetic import LancBiOSynthetic, lancbio_synthetic
from bilevel_jax.problems import hyperclean, pruning, subset_selection
from bilevel_jax.problems.flat import FlatBilevel, flat_bilevel
from bilevel_jax.problems.hyperclean import HyperCleaning, fashion_mnist_hyper_cleaning, hyper_cleaning
from bilevel_jax.problems.pruning import Pruning
from bilevel_jax.problems.subset_selection import SubsetSelection
from bilevel_jax.problems.logistic import LOGISTIC, LogisticHPO, ValueSolution, logistic_hpo
from bilevel_jax.problems.quadratic import (QuadraticBilevel, quadratic_bilevel, quadratic_lower, quadratic_problem,
                                             quadratic_upper)
from bilevel_jax.problems.ridge import RIDGE, RidgeHPO, ridge_hpo

__all__ = [
    "Instance", "Reference",
    "FlatBilevel", "flat_bilevel",
    "HyperCleaning", "fashion_mnist_hyper_cleaning", "hyper_cleaning", "hyperclean",
    "Pruning", "pruning", "SubsetSelection", "subset_selection",
    "LancBiOSynthetic", "lancbio_synthetic",
    "LOGISTIC", "LogisticHPO", "ValueSolution", "logistic_hpo",
    "QuadraticBilevel", "quadratic_bilevel", "quadratic_problem", "quadratic_upper", "quadratic_lower", "RIDGE", "RidgeHPO", "ridge_hpo",
]
