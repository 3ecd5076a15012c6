# Two commands do all the set-up on a fresh machine:  `make run`  and  `make test`.
# The environment is built once by scripts/setup_env.sh (outside the checkout, keyed by requirements/cpu.lock).
SHELL := /bin/bash
CONFIG ?= configs/grpo_local.yaml
ARGS ?=
TEST_WORKERS ?= 2
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: env run sft test bench shell
env:
	@scripts/setup_env.sh

run:
	@V=$$(scripts/setup_env.sh) && "$$V/bin/python" -m rl.launch $(CONFIG) $(ARGS)

sft:
	@V=$$(scripts/setup_env.sh) && "$$V/bin/python" -m rl.launch configs/sft_local.yaml $(ARGS)

test:  # two workers (pytest-xdist), a file at a time each (module fixtures built once), files in conftest's order
	@V=$$(scripts/setup_env.sh) && "$$V/bin/python" -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

bench:
	@V=$$(scripts/setup_env.sh) && for b in benchmarks/bench_*.py; do "$$V/bin/python" $$b || exit 1; done

shell:
	@echo "source $$(scripts/setup_env.sh)/bin/activate && export PYTHONPATH=$(CURDIR)"
