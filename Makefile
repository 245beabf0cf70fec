# Set-up, the offline demo and the tests. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_EVAL := --backbone digits_simclr_cnn --shards shards/digits --real-res 32 --crop-res 32

.PHONY: install demo demo-run test test-fast lint clean-demo

install: $(VENV)/.installed

# torch is pinned: these wheels lie on this kind of machine's disk (an unpinned torch pulls a
# different multi-GB build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

shards/digits/manifest.json: | install
	$(PY) -m lgm_ray.shards build digits --out shards/digits

# The offline demo sweep: digits shards → every demo backbone × a small ablation grid on a local Ray →
# cross-model table, MLflow (sqlite:///mlflow.db) and the report. Re-running with --resume skips finished trials.
demo: install
	$(PY) -m lgm_ray.sweep sweeps/demo.yaml --resume

# One run of the single-run demo config, evaluated against the baselines.
demo-run: install shards/digits/manifest.json
	$(PY) -m lgm_ray.distill --config configs/digits_demo.yaml --out runs/demo --resume
	$(PY) -m lgm_ray.evaluate --synset runs/demo/synset.pt --backbone digits_simclr_cnn --shards shards/digits
	$(PY) -m lgm_ray.evaluate --baseline random $(DEMO_EVAL)
	$(PY) -m lgm_ray.evaluate --baseline centroids $(DEMO_EVAL)
	$(PY) -m lgm_ray.evaluate --baseline full $(DEMO_EVAL)
	@echo "distilled images: runs/demo/grid.png"

lint: install
	$(PY) -m ruff check lgm_ray tests benchmarks scripts

# The whole suite.
# The whole suite. The sweep's tests (Ray Tune over Ray Train, real signals) run in a pytest process of
# their own, apart from the modules that start and stop other Rays before them.
test: install lint
	$(PY) -m pytest -q --ignore=tests/sweep
	$(PY) -m pytest -q tests/sweep

# Every test not marked slow (the quick check while working).
test-fast: install lint
	$(PY) -m pytest -q -m "not slow"

clean-demo:
	rm -rf runs/demo shards/digits
