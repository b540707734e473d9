# The two set-up commands of the README:
#   make demo   -- create .venv, install, run the main job
#   make test   -- create .venv, install, run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: demo test bench gpu-check gpu-window install clean

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/ctrefine demo --out $(DEMO_DIR)

test: $(VENV)/.installed
	bash tests/install_browser.sh
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: $(VENV)/.installed
	$(PY) -m pytest -q bench --benchmark-json=bench/results-cpu.json

# on a CUDA machine with torch + triton and no network (wheels in .whl/): bench/gpu_check.sh's header
gpu-check:
	bash bench/gpu_check.sh

# one window of the relay that trains the mission's full pair (bench/relay.py): on the GPU machine, wheels in .whl/;
# brings back $(OUT)/relay/ (fp16 parts + relay_log.json) to commit as relay/
gpu-window:
	bash bench/train_full.sh

clean:
	rm -rf $(VENV) runs *.egg-info
