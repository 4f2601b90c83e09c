# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export JALIGN_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo chat test bench fetch-models serve-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

# PyTriton (the critic server, python -m jalign.serve) pins numpy<2, which this JAX cannot use: it goes
# into .venv without its dependencies (those it needs are installed beside it), and Triton's
# Python-backend stub runs from .venv-triton, a Python environment of its own with numpy<2.
PYTRITON := nvidia-pytriton==0.7.0
$(VENV)/.installed-serve: | $(PY)
	rm -rf .venv-triton
	$(PYTHON) -m venv .venv-triton
	.venv-triton/bin/pip install -q $(PYTRITON)
	$(PY) -m pip install -q --no-deps $(PYTRITON) tritonclient==2.73.0
	$(PY) -m pip install -q python-rapidjson "urllib3>=2.0.7" "aiohttp>=3.8.1,<4" "geventhttpclient>=2.3.3" \
	  "greenlet<3.4.0" pyzmq sh typing_inspect wrapt typer importlib_metadata packaging "grpcio>=1.81.1"
	touch $@

serve-deps: $(VENV)/.installed $(VENV)/.installed-serve

# The main job on the embedded default: SFT of the tiny model on the bundled chat data.
demo: $(VENV)/.installed
	$(PY) -m jalign.demo --run-dir=runs/sft_tiny-$$(date +%Y%m%d-%H%M%S)

# SmolLM2-135M-Instruct answering chat prompts with greedy decoding.
chat: $(VENV)/.installed
	$(PY) -m jalign.demo --chat

fetch-models: $(VENV)/.installed
	$(PY) -c "from jalign.models.pretrained import smollm2_path; print(smollm2_path())"

test: $(VENV)/.installed-test $(VENV)/.installed-serve fetch-models
	$(PY) -m pytest -n 2 --dist loadfile --durations=60 tests

bench: $(VENV)/.installed-test fetch-models
	$(PY) bench/bench_model.py
	$(PY) bench/bench_sft.py
	$(PY) bench/bench_mesh.py

clean:
	rm -rf $(VENV) .venv-triton .cache .pytest_cache
