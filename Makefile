# Two commands: `make run` and `make test`. Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export COVIDXRAY_DATA ?= $(abspath ../shared/datasets/covid-cxr)
# On two cores, keep glibc from returning big activation buffers to the OS after every batch.
export MALLOC_MMAP_MAX_ ?= 0

.PHONY: run test install model clean

# Re-install only when the dependency list changes; the stamp makes repeated runs instant.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -ra

run: $(STAMP)
	$(VENV)/bin/covidxray demo

model: $(STAMP)
	bash bench/train_default.sh

clean:
	rm -rf $(VENV) .pytest_cache
