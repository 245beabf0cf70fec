# Set-up, the offline demo and the tests. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_EVAL := --backbone digits_simclr_cnn --shards shards/digits --real-res 32 --crop-res 32

.PHONY: install demo test lint clean-demo

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

# The offline demo: digits as WebDataset shards → distil 1 image per class with the demo backbone
# → evaluate it against the baselines. Re-running resumes / reuses what is already there.
demo: install shards/digits/manifest.json
	$(PY) -m lgm_ray.distill --config configs/digits_demo.yaml --out runs/demo --resume
	$(PY) -m lgm_ray.evaluate --synset runs/demo/synset.pt $(DEMO_EVAL)
	$(PY) -m lgm_ray.evaluate --baseline random $(DEMO_EVAL)
	$(PY) -m lgm_ray.evaluate --baseline centroids $(DEMO_EVAL)
	$(PY) -m lgm_ray.evaluate --baseline full $(DEMO_EVAL)
	@echo "distilled images: runs/demo/grid.png"

lint: install
	$(PY) -m ruff check lgm_ray tests benchmarks scripts

test: install lint
	$(PY) -m pytest -q

clean-demo:
	rm -rf runs/demo shards/digits
