# Two commands: `make run` (set up, then train on the bundled corpus and sample) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA := data/shakespeare-char
RUN ?= runs/shakespeare-char

.PHONY: run test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/glmlab prepare --out $(DATA) --tokenizer char
	@if [ -f $(RUN)/config.json ]; then \
		echo "$(RUN) already holds a trained run: sampling from it (delete it, or make run RUN=runs/other, to train anew)"; \
	else \
		$(BIN)/glmlab train --data $(DATA) --out $(RUN) --config configs/shakespeare-char.yaml; \
	fi
	$(BIN)/glmlab eval $(RUN) --split test
	$(BIN)/glmlab generate $(RUN) --prompt "ROMEO:" --max-new-tokens 300 --num-samples 2 --temperature 0.8 --seed 1

test: $(STAMP)
	$(BIN)/ruff check glmlab tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check glmlab tests benchmarks

clean:
	rm -rf $(VENV) data runs .pytest_cache
