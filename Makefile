# make all    build .venv from requirements.txt if missing, run every experiment whose outputs are
#             not complete yet, in order, then build both reports into $(OUT)/report/
# make quick  the same chain with every script's --quick, into outputs/quick/ (about a minute)
# make test   build .venv if missing, run the test suite
# Redo everything: make -B all FLAGS=--fresh.  Another device: make all DEVICE=cuda.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
OUT ?= outputs
FLAGS ?=
DEVICE ?= auto
RUN = time $(PY) $< $(FLAGS) --device $(DEVICE) --out $(@D)
METRICS := $(foreach s,sup_classification vae_amortized vae_latent_opt log_likelihood ppca_pca,$(OUT)/$(s)/metrics.json)

.PHONY: all quick test venv
all: $(OUT)/report/ex1_report.pdf

quick:
	$(MAKE) all OUT=outputs/quick FLAGS=--quick

test: $(STAMP)
	$(PY) -m pytest -q tests

venv: $(STAMP)
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(OUT)/sup_classification/metrics.json: sup_classification.py | $(STAMP)
	$(RUN)
$(OUT)/vae_amortized/metrics.json: vae_amortized.py | $(STAMP)
	$(RUN)
$(OUT)/vae_latent_opt/metrics.json: vae_latent_opt.py $(OUT)/vae_amortized/metrics.json | $(STAMP)
	$(RUN) --amortized $(OUT)/vae_amortized/vae_final.pt
$(OUT)/log_likelihood/metrics.json: log_likelihood.py $(OUT)/vae_amortized/metrics.json | $(STAMP)
	$(RUN) --checkpoint $(OUT)/vae_amortized/vae_final.pt
$(OUT)/ppca_pca/metrics.json: ppca_pca.py | $(STAMP)
	$(RUN)
$(OUT)/report/ex1_report.pdf: report/build_report.py $(METRICS) | $(STAMP)
	time $(PY) report/build_report.py --outputs $(OUT) --device $(DEVICE)
