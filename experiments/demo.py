"""`make demo`: the hyperparameter-selection comparison of Dagréou et al. 2022
(arXiv:2201.13409) on real, embedded data.

    python -m experiments.demo [key=value ...]       # same overrides as `python -m experiments`

Binary logistic regression on scikit-learn's breast-cancer data (`bilevel_jax.datasets.
breast_cancer`: 285 training rows for the lower level, 284 validation rows for the upper level,
30 standardised features) with one regulariser exp(theta_k) per feature:

    h(theta) = validation loss of w*(theta),  w*(theta) = argmin_w training loss + 1/2 sum_k exp(theta_k) w_k^2

Seven stochastic bilevel algorithms of `bj.algorithms` (SOBA, SABA, SRBA, AmIGO, StocBiO, TTSA,
MRBO; minibatches of 32, 3 seeds each, `configs/demo.toml`) run as one vmapped, jitted sweep per
algorithm. Prints a table (seeds that diverged, final h - h* over the others, the wall time and
oracle calls after which h - h* stays <= 1e-2, the hyperparameters) and writes
`results/demo/demo.png` (h - h* against time and oracle calls, median and 20-80% band; failed
seeds named in the legend). h* is the minimum of the exact h over the box theta_bounds that the
runs project onto (L-BFGS-B; damped Newton for w*), lowered to the best point a run reached if
one beats it, so gaps are never negative. Finished cells are cached under
`results/demo/cells/`: a second run only redraws (delete the folder to recompute).
"""
from __future__ import annotations

import os
import sys
import time

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.toml")


def main(argv=None) -> dict:
    from experiments import convergence
    from experiments.config import load

    start = time.perf_counter()
    cfg = load(CONFIG, sys.argv[1:] if argv is None else argv)
    print(cfg["title"])
    print(f"  {len(cfg['algorithms'])} algorithms x {cfg['seeds']} seeds, {cfg['steps']} outer steps "
          "(double-loop methods: fewer, see configs/demo.toml)\n")
    out = convergence.main(cfg, log=lambda *a: print(*a) if a and not str(a[0]).startswith(("|", "figure:", "h* ")) else None)
    ref = out["reference"]
    target = cfg["plot"]["target"]
    h_star = ref.get("value_star_checked", ref["value_star"])
    print(f"\nh(theta) = validation loss of w*(theta); h* = {h_star:.6f}: {ref.get('value_star_method', 'L-BFGS')} "
          f"(projected gradient norm {ref['value_star_grad_norm']:.1e}); h(theta_0) - h* = "
          f"{ref['value_initial'] - h_star:.3f}")
    if out.get("reference_note"):
        print(out["reference_note"])
    print()
    print(_table(out["rows"], target))
    print(f"\nfigure: {out['figure']}")
    print(f"total: {time.perf_counter() - start:.1f} s (compilation included; {len(out['stats'].computed)} "
          f"cell(s) computed, {len(out['stats'].skipped)} cached)")
    return out


def _table(rows, target) -> str:
    from experiments.results import fmt as _fmt
    head = ("algorithm", "seeds failed", "final h - h* (median [20%, 80%] of the others)",
            f"time to stay <= {target:g} (s)", f"oracle calls to stay <= {target:g}", "oracle calls (total)",
            "hyperparameters")
    body = [(r.label, r.failed, f"{r.final:.2e} [{r.final_lo:.2e}, {r.final_hi:.2e}]" if r.final == r.final
             else "no finite run", _fmt(r.time_to_target, ".3f"), _fmt(r.oracles_to_target, ".3g"),
             _fmt(r.oracles_total, ".3g"), r.hyper) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


if __name__ == "__main__":
    main()
