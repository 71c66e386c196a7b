# pconv: two commands do everything on a fresh machine.
#   make demo   -> venv + install + convert a real ImageNet EfficientNet-Lite0 on real images
#   make test   -> venv + install + the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.pconv-installed

.PHONY: install demo test test-fast bench-conversion clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch/torchvision first, pinned to the builds the machine's pip can install offline.
	$(PIP) install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install --quiet -e ".[test,demo]"
	$(PIP) install --quiet --no-deps "foolbox==3.3.4"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pconv demo

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench-conversion: $(STAMP)
	$(PY) bench/conversion_table.py | tee docs/conversion_table.txt

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
