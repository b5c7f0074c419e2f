# Every target installs what it needs into .venv first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-all demo bench figures clean examples fashion-mnist fig-hyperclean fig-hyperclean-p08 fig-hyperclean-mlp fig-hessian-free

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,experiments]"
	touch $(STAMP)

install: $(STAMP)

# The suite runs on TEST_WORKERS processes (pytest-xdist; CI has 2 cores). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest tests -x -n $(TEST_WORKERS) --durations=15

test-all: $(STAMP)
	$(PY) -m pytest tests --runslow -n $(TEST_WORKERS)

demo: $(STAMP)
	$(PY) -m experiments.demo

# Paper figures: `make fig-quadratic`, `make fig-hpo-logreg full=true` (paper size), ARGS="key=value ...".
# Outputs in results/<name>/ (results/<name>-full/ with full=true): the PNG, summary.md, sweep.csv and
# cells/ (one NPZ + JSON per finished cell; a rerun computes only the missing ones).
FIGURES := hpo-logreg inner-accuracy quadratic rates morbit lancbio lancbio-dim hessian-free
fig-%: $(STAMP)
	$(PY) -m experiments configs/$(subst -,_,$*).toml $(if $(full),full=$(full)) $(ARGS)

figures: $(addprefix fig-,$(FIGURES))

# Hessian-free / value-function presets vs SOBA, AmIGO, StocBiO: two configs, one target (~4 min on 2 cores).
fig-hessian-free: $(STAMP)
	$(PY) -m experiments configs/hessian_free_quadratic.toml $(if $(full),full=$(full)) $(ARGS)
	$(PY) -m experiments configs/hessian_free_logreg.toml $(if $(full),full=$(full)) $(ARGS)

# Fashion-MNIST (Debian's dataset-fashion-mnist): installed when missing and we are root, else the
# command to run is printed. $BILEVEL_JAX_FASHION_MNIST may point at a folder with the IDX files instead.
fashion-mnist:
	@if [ -n "$$BILEVEL_JAX_FASHION_MNIST" ] || [ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] \
	    || [ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y dataset-fashion-mnist || \
	    (apt-get update && apt-get install -y dataset-fashion-mnist); \
	else echo "Fashion-MNIST is missing: run  sudo apt-get install -y dataset-fashion-mnist  (or set" \
	    "BILEVEL_JAX_FASHION_MNIST to a folder with the IDX files)"; exit 1; fi

# Data hyper-cleaning on Fashion-MNIST (configs/hyperclean.toml): under 5 minutes on 2 cores.
fig-hyperclean: $(STAMP) fashion-mnist
	$(PY) -m experiments configs/hyperclean.toml $(if $(full),full=$(full)) $(ARGS)

# The same at corruption 0.8 (configs/hyperclean_p08.toml, the paper's second pollution rate).
fig-hyperclean-p08: $(STAMP) fashion-mnist
	$(PY) -m experiments configs/hyperclean_p08.toml $(if $(full),full=$(full)) $(ARGS)

# An MLP (101,898 parameters) on the full 60,000-image training split, 80% of the labels wrong, SOBA on
# minibatches next to plain training and clean-only training (configs/hyperclean_mlp.toml): about
# 4 minutes on 2 cores; full=true is the GPU size.
fig-hyperclean-mlp: $(STAMP) fashion-mnist
	$(PY) -m experiments configs/hyperclean_mlp.toml $(if $(full),full=$(full)) $(ARGS)

# Benchmarks (jaxopt is installed here only, as the peer; benchmark_bilevel is a benchopt repository, not a
# package: its solvers are re-implemented in benchmarks/peer_bilevel.py): writes results/bench/bench.json
# and bench.md. ARGS="--quick" for a smoke run, ARGS="--only reference,bilevel,bandwidth" for a part.
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks $(ARGS)

# Every script in examples/ with --quick (examples/README.md lists them).
examples: $(STAMP)
	@set -e; for f in examples/*.py; do echo "== $$f --quick"; $(PY) $$f --quick; done

clean:
	rm -rf $(VENV) results
