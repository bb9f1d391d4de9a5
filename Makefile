# Two commands: `make run` and `make test`. Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export COVIDXRAY_DATA ?= $(abspath ../shared/datasets/covid-cxr)
# On two cores, keep glibc from returning big activation buffers to the OS after every batch.
export MALLOC_MMAP_MAX_ ?= 0

.PHONY: run test install systemdeps model clean

# Re-install only when the dependency list changes; the stamp makes repeated runs instant.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(STAMP)

# Debian programs the tests drive, installed once (one apt-get update): Chromium for tests/test_browser.py
# (Playwright's own browser download is never used); a real PACS (Orthanc) and a second DICOM implementation
# (dcmtk's storescu, echoscu, dcmcjpeg; the DICOMweb plugin for STOW-RS) for tests/test_pacs.py, which starts its own Orthanc on free ports;
# PostgreSQL's initdb and pg_ctl for the results-store tests, which start their own server (tests/postgres.py).
systemdeps:
	@{ command -v chromium && command -v storescu && test -x /usr/sbin/Orthanc && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so && ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium orthanc orthanc-dicomweb dcmtk postgresql; }

test: $(STAMP) systemdeps
	$(PY) -m pytest -ra

# The web page and REST API on the bundled model; `covidxray demo` still classifies a few X-rays in the terminal.
HOST ?= 127.0.0.1
PORT ?= 8000
run: $(STAMP)
	@echo "covidxray: open http://$(HOST):$(PORT)/ (API docs: http://$(HOST):$(PORT)/docs); Ctrl-C stops"
	$(VENV)/bin/covidxray serve --host $(HOST) --port $(PORT)

# Rebuild every shipped artefact in order: lung segmenter, input gate, classifier (bench/train_default.sh).
model: $(STAMP)
	bash bench/train_default.sh

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
