# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export JALIGN_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo chat test bench fetch-models clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

# The main job on the embedded default: SFT of the tiny model on the bundled chat data.
demo: $(VENV)/.installed
	$(PY) -m jalign.demo --run-dir=runs/sft_tiny-$$(date +%Y%m%d-%H%M%S)

# SmolLM2-135M-Instruct answering chat prompts with greedy decoding.
chat: $(VENV)/.installed
	$(PY) -m jalign.demo --chat

fetch-models: $(VENV)/.installed
	$(PY) -c "from jalign.models.pretrained import smollm2_path; print(smollm2_path())"

test: $(VENV)/.installed-test fetch-models
	$(PY) -m pytest -n 2 --dist loadfile --durations=15 tests

bench: $(VENV)/.installed-test fetch-models
	$(PY) bench/bench_model.py
	$(PY) bench/bench_sft.py
	$(PY) bench/bench_mesh.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
