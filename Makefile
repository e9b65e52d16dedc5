# make demo / make test / make bench: everything set up from nothing in ./.venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Exactly the torch this machine's CI and developers run; the package itself takes a range.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-gpu bench info clean

# PYTHONWARNINGS: setuptools' notice about editable installs is not a warning about anything here.
$(VENV)/.ready: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PINS)
	PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip install -q --no-build-isolation -e '.[dev,demo]'
	touch $@

# The main job on the embedded digits, for every family: pretrain, unlearn two ways, evaluate (about 5 minutes on 2 cores).
demo: $(VENV)/.ready
	$(VENV)/bin/fastforget demo --out demo-out

# The tests, then the pytest-benchmark suites once each, untimed, so they cannot rot.
test: $(VENV)/.ready
	$(PY) -m pytest -q -ra
	$(PY) -m pytest -q benchmarks/ --benchmark-disable

test-gpu: $(VENV)/.ready
	$(PY) -m pytest -q -ra -m gpu

# Every op against its roofline, then the whole step against the reference loop (CSV and PNG in bench-out/).
bench: $(VENV)/.ready
	mkdir -p bench-out
	$(VENV)/bin/fastforget bench ops --csv bench-out/ops.csv
	$(VENV)/bin/fastforget bench step --compile --csv bench-out/step.csv

info: $(VENV)/.ready
	$(VENV)/bin/fastforget info

clean:
	rm -rf $(VENV) build bench-out *.egg-info .pytest_cache
