# Every target that needs the virtual environment depends on it, so each command works on a fresh clone by itself.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR ?= cpu

.PHONY: install test lint format demo bench clean

install: $(STAMP)

# Re-installs only when the requirement files change; a second `make install` is a no-op.
$(STAMP): requirements.txt constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt -c constraints.txt
	# DeepSpeed compiles its CPU shared-memory collective op on first use (about a minute on 2 cores, into
	# ~/.cache/torch_extensions): build it here, once, rather than inside the first train.py run of the tests
	DS_ACCELERATOR=$(DS_ACCELERATOR) $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	@touch $(STAMP)

# Two workers, a test file each at a time (module fixtures stay in one worker): most tests run train.py, warmup.py or
# evaluate.py in single-threaded subprocesses, so the two cores of the box are used instead of one.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: $(STAMP)
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

# The main job: the whole method in miniature on a CPU (shapes world, tiny Qwen-VL, train.py, evaluate.py).
demo: $(STAMP)
	$(PY) -m miniature.demo

# GRPO step benchmark: tiny policy on CPU, the full-size Qwen2.5-VL-7B architecture (random weights) on a GPU.
bench: $(STAMP)
	$(PY) speed.py

clean:
	rm -rf .venv .pytest_cache .ruff_cache .hypothesis runs
