# Every target installs what it needs into .venv first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-all demo bench figures clean examples

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,experiments]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -x

test-all: $(STAMP)
	$(PY) -m pytest tests --runslow

demo: $(STAMP)
	$(PY) -m experiments.demo

# Paper figures: `make fig-quadratic`, `make fig-hpo-logreg full=true` (paper size), ARGS="key=value ...".
# Outputs in results/<name>/ (results/<name>-full/ with full=true): the PNG, summary.md, sweep.csv and
# cells/ (one NPZ + JSON per finished cell; a rerun computes only the missing ones).
FIGURES := hpo-logreg inner-accuracy quadratic rates morbit lancbio lancbio-dim
fig-%: $(STAMP)
	$(PY) -m experiments configs/$(subst -,_,$*).toml $(if $(full),full=$(full)) $(ARGS)

figures: $(addprefix fig-,$(FIGURES))

# Benchmarks (jaxopt is installed here only, as the peer): writes results/bench/bench.json.
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks $(ARGS)

# Every script in examples/ with --quick (examples/README.md lists them).
examples: $(STAMP)
	@set -e; for f in examples/*.py; do echo "== $$f --quick"; $(PY) $$f --quick; done

clean:
	rm -rf $(VENV) results
