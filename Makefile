# Quickstart targets. `.venv` is (re)built only when pyproject.toml changed.
PY      := .venv/bin/python
STAMP   := .venv/.installed

.PHONY: demo test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) sweeps/run.py --space examples/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

# Everything but the integration and fault tests marked `slow`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf .venv .cache/lorasweep runs
