"""Experiments: one module per reproduced figure/table (run with `python -m experiments.<name>`)."""
