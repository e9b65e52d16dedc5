# make demo / make test / make bench: everything set up from nothing in ./.venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Exactly the torch this machine's CI and developers run; the package itself takes a range.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-gpu bench info clean

$(VENV)/.ready: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,demo]'
	touch $@

# The main job on the embedded digits: pretrain, unlearn two ways, evaluate (under 3 minutes on 2 cores).
demo: $(VENV)/.ready
	$(VENV)/bin/fastforget demo --out demo-out

test: $(VENV)/.ready
	$(PY) -m pytest -q -ra

test-gpu: $(VENV)/.ready
	$(PY) -m pytest -q -ra -m gpu

bench: $(VENV)/.ready
	$(VENV)/bin/fastforget bench loss
	$(VENV)/bin/fastforget bench patch
	$(VENV)/bin/fastforget bench teacher

info: $(VENV)/.ready
	$(VENV)/bin/fastforget info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
