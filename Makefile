# Two commands on a fresh machine: `make demo` and `make test` (both create .venv first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo lint clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	# The OpenAI CLIP BPE vocabulary file for the offline tokenizer (its torchvision dependency is not needed).
	$(PIP) install -q --no-deps openai-clip==1.0.1
	touch $(STAMP)

# The whole suite, slow full-size checks included (as CI runs it). A crashed worker ends the run
# (--max-worker-restart 0): pytest-xdist 3.8's loadfile scheduler can deadlock after replacing one.
test: venv
	$(PY) -m pytest -n 2 --dist loadfile --max-worker-restart 0 -q --durations=15

# Everything but the slow full-size checks.
test-fast: venv
	$(PY) -m pytest -n 2 --dist loadfile --max-worker-restart 0 -q -m "not slow"

# The main job on the embedded default: generate CALVIN-format data, precompute teachers, train, evaluate.
demo: venv
	$(PY) -m dreamvla_jax.demo --workdir runs/demo

lint: venv
	$(VENV)/bin/ruff check dreamvla_jax tests configs

clean:
	rm -rf $(VENV) runs .pytest_cache
