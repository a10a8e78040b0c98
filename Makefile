# make demo : set up .venv (once), run the synthetic demo and build its book
# make test : set up .venv (once), run the test suite
# make book RUN=runs/demo : rebuild the book of an existing run
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.d3m-installed
# The versions the study was run with. Installed before the package so that pip
# does not resolve (and download) another torch build.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
RUN    ?= runs/demo

.PHONY: setup demo test book clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e '.[dev,ray]'
	@# papermill runs kernel "python3": make sure it is this environment's
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m d3m_lib run params/demo.yaml --book
	@echo "Open the book: $(CURDIR)/runs/demo/book/_build/html/index.html"

test: $(STAMP)
	$(PY) -m ruff check d3m_lib tests scripts benchmarks
	$(PY) -m pytest -q

book: $(STAMP)
	$(PY) -m d3m_lib book $(RUN)

clean-runs:
	rm -rf runs/
