"""Experiments: `python -m experiments configs/<name>.toml [key=value ...]` (see __main__), one
module per figure with custom logic (convergence, rates), the demo (`python -m experiments.demo`)."""
