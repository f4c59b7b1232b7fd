# Two commands on a fresh machine:  make demo  (sets up and runs the pipeline)  and  make test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VAPIPE := $(VENV)/bin/vapipe
SHARED ?= $(abspath ../shared)
# Our machines have no internet: use the shared model when it is there, else the official weights.
DEMO_MODEL ?= $(if $(wildcard $(SHARED)/models/yolov8n_int8.onnx),$(SHARED)/models/yolov8n_int8.onnx,yolov8n.pt)

.PHONY: setup system-deps kafka-jars demo test test-unit lint clean

setup: $(VENV)/.installed system-deps

# GStreamer's RTSP server for the live-camera tests (apt, when missing and root; else one line saying so).
system-deps:
	@scripts/system_deps.sh

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench]"
	touch $@

kafka-jars: setup
	$(VAPIPE) kafka install

demo: setup kafka-jars
	VAPIPE_MODEL__NAME="$${VAPIPE_MODEL__NAME:-$(DEMO_MODEL)}" $(VAPIPE) demo

test: setup kafka-jars
	VAPIPE_SHARED="$(SHARED)" scripts/test.sh $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test-unit: setup
	VAPIPE_SHARED="$(SHARED)" $(PY) -m pytest -q tests/pipeline tests/cluster/test_cluster_yaml.py $(PYTEST_ARGS)

clean:
	rm -rf output .cache/test-kafka
