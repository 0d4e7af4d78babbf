#!/usr/bin/env bash
# make test-slurm: jobs/slurm.sbatch on a real one-node SLURM cluster (tools/slurm_cluster.sh).
#
# Brings the cluster up (installing slurm-wlm, munge and libpmix2 with apt-get if missing), then
# submits jobs with 4 tasks through `sbatch jobs/slurm.sbatch` and checks:
#   - convert: the job ends COMPLETED 0:0 and writes a shard set for a 2x2 rank grid;
#   - generate --json with srun, and again with LAUNCHER=mpirun: COMPLETED 0:0, the job's stdout
#     is the JSON record alone, and its tokens equal an `mpiexec -n 4` run of the same command;
#   - no rank printed the PMIx security warning (PMIX_MCA_psec=native);
#   - a job on 2 tasks given the 4-rank shard set ends FAILED with the loader's error in its log;
#   - a job whose srun starts singletons (SRUN_MPI=pmi2) ends FAILED with the rank-count error;
#   - batch: a JSON-lines file of requests (one line bad) ends COMPLETED 0:0, its results equal
#     `mpiexec -n 4 ... generate --batch`'s request by request, and the bad line is reported;
#   - the batch job again on results cut as by a kill mid-write: the finished request is kept,
#     the others run again, and the results equal mpiexec's once more.
# The jobs get neither an activated venv nor the Makefile's Open MPI variables: the script has to
# find .venv and set what it needs itself. Each job is polled with squeue every 0.5 s, under a
# timeout. The daemons are stopped on exit (by pid), whatever happens.
#
# Needs root and apt-get (or the packages). Without them it prints one line and exits 0, unless
# REQUIRE_SLURM=1 (CI), which makes that a failure. Ends with "N passed, N failed".
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PY="$REPO/.venv/bin/python"
MPIEXEC="$REPO/.venv/bin/mpiexec"
CLUSTER="$REPO/tools/slurm_cluster.sh"
JOB_TIMEOUT="${JOB_TIMEOUT:-120}"      # seconds from submission to the end of one job
TASKS=4
MODEL=tests/fixtures/tiny-llama-gqa
PROMPT="the mesh passes the cache"
NEW_TOKENS=12

if ! reason="$("$CLUSTER" check 2>&1)"; then
    if [[ "${REQUIRE_SLURM:-0}" == 1 ]]; then
        echo "test-slurm: cannot run ($reason), and REQUIRE_SLURM=1"
        echo "test-slurm: 0 passed, 1 failed"
        exit 1
    fi
    echo "test-slurm: skipped: $reason"
    exit 0
fi
[[ -x "$PY" ]] || { echo "test-slurm: no $PY (run make install)"; exit 1; }

timeout -k 10 600 "$CLUSTER" install || { echo "test-slurm: installing the packages failed"; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/waferllm-test-slurm.XXXXXX")"
passed=0
failed=0
cleanup() {
    [[ -z "$WORK" ]] && return
    "$CLUSTER" down || true
    if [[ "$failed" == 0 ]]; then rm -rf "$WORK"; else echo "test-slurm: logs kept in $WORK"; fi
    WORK=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=tests/checks.sh
source "$REPO/tests/checks.sh"

# The jobs must work without what a shell or the Makefile may carry: an activated venv on PATH,
# Open MPI's root and oversubscribe variables.
PATH="$(echo "$PATH" | tr ':' '\n' | grep -vxF "$REPO/.venv/bin" | paste -sd: -)"
unset VIRTUAL_ENV PYTHON
for var in $(env | sed -n 's/^\(OMPI_[A-Za-z0-9_]*\|PRTE_[A-Za-z0-9_]*\|PMIX_[A-Za-z0-9_]*\)=.*/\1/p'); do
    unset "$var"
done
MPI_ENV=(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
         PRTE_MCA_rmaps_default_mapping_policy=:oversubscribe OMPI_MCA_pml=ob1
         OMPI_MCA_btl=self,sm OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1)

# Daemons left by an earlier run that was killed outright (they are recorded by pid).
"$CLUSTER" down 2>/dev/null || true
if ! timeout -k 10 120 "$CLUSTER" up; then
    not_ok "the one-node cluster comes up" "${SLURM_TEST_DIR:-/tmp/waferllm-slurm}"/log/*.log
    cleanup
    echo "test-slurm: $passed passed, $failed failed"
    exit 1
fi
eval "$("$CLUSTER" env)"

# submit NAME [sbatch options] -- [slurm.sbatch arguments]: run one job to its end.
# Sets JOB (id) and STATE ("JobState ExitCode", e.g. "COMPLETED 0:0"); logs in $WORK/NAME.out/.err.
submit() {
    local name="$1" opts=() deadline
    shift
    while [[ $# -gt 0 && "$1" != -- ]]; do opts+=("$1"); shift; done
    shift
    JOB="$(timeout 30 sbatch --parsable --job-name="$name" --ntasks="$TASKS" \
           --output="$WORK/$name.out" --error="$WORK/$name.err" \
           ${opts[@]+"${opts[@]}"} jobs/slurm.sbatch "$@" </dev/null)" || { STATE="sbatch-failed"; return; }
    JOB="${JOB%%;*}"
    deadline=$((SECONDS + JOB_TIMEOUT))
    while [[ -n "$(timeout 10 squeue -h -j "$JOB" -o %T 2>/dev/null)" ]]; do
        if (( SECONDS >= deadline )); then
            timeout 10 scancel "$JOB" || true
            STATE="TIMEOUT-${JOB_TIMEOUT}s"
            return
        fi
        sleep 0.5
    done
    STATE="$(timeout 10 scontrol show job "$JOB" |
             sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p; s/.*[^a-zA-Z]ExitCode=\([0-9:]*\).*/\1/p' | paste -sd' ' -)"
}

# expect_state NAME WANT: the last job ended in WANT ("COMPLETED 0:0", or "FAILED" with any code).
expect_state() {
    if [[ "$STATE" == "$2" || ( "$2" == FAILED && "$STATE" == "FAILED "* && "$STATE" != *" 0:0" ) ]]; then
        ok "$1: job $JOB ended $STATE"
    else
        not_ok "$1: job $JOB ended '$STATE', expected $2" "$WORK/$1.err" "$WORK/$1.out"
    fi
}

# reference NAME llm-arguments...: the same command under mpiexec -n TASKS, stdout in $WORK/NAME.ref
reference() {
    local name="$1"
    shift
    env "${MPI_ENV[@]}" timeout -k 10 120 "$MPIEXEC" -n "$TASKS" "$PY" -m mpi4py -m llm "$@" \
        > "$WORK/$name.ref" 2> "$WORK/$name.ref.err" </dev/null
}

# same_tokens NAME [JOB_OUTPUT REFERENCE_OUTPUT ID...]: the job's tokens equal mpiexec's
# (default: the generate --json records in $WORK/NAME.out and $WORK/NAME.ref).
same_tokens() {
    local name="$1" out
    shift
    [[ $# -gt 0 ]] || set -- "$WORK/$name.out" "$WORK/$name.ref"
    if out="$(timeout 60 "$PY" tests/slurm/same_tokens.py "$@" 2>&1)"; then
        ok "$name: tokens equal mpiexec -n $TASKS ($out)"
    else
        not_ok "$name: tokens differ from mpiexec -n $TASKS: $out" "$WORK/$name.err" "$WORK/$name.ref.err"
    fi
}

no_psec_warning() {
    if grep -q 'not-valid\|help-pmix-mca-base' "$WORK/$1.err"; then
        not_ok "$1: a rank printed the PMIx security warning" "$WORK/$1.err"
    else
        ok "$1: no PMIx security warning"
    fi
}

SHARDS="$WORK/shards-4r"
COMMON="ALL,MODEL=$MODEL,SHARDS=$SHARDS,DECODE_MESH=4x4,MAX_NEW_TOKENS=$NEW_TOKENS"

# 1. convert
submit convert --export="$COMMON" -- convert
expect_state convert "COMPLETED 0:0"
grid="$(timeout 30 "$PY" -c 'import json, sys; m = json.load(open(sys.argv[1]))
print("x".join(map(str, m["rank_grid"])), m["dtype"])' "$SHARDS/manifest.json" 2>&1)"
if [[ "$grid" == "2x2 float32" ]]; then
    ok "convert: the shard set is for a 2x2 rank grid, float32"
else
    not_ok "convert: expected a 2x2 float32 shard set in $SHARDS, got: $grid" "$WORK/convert.err"
fi
no_psec_warning convert

# 2. generate with srun --mpi=pmix, against mpiexec
submit generate --export="$COMMON" -- generate --prompt "$PROMPT" --json
expect_state generate "COMPLETED 0:0"
reference generate generate --model "$SHARDS" --prompt "$PROMPT" --max-new-tokens "$NEW_TOKENS" --json
same_tokens generate
no_psec_warning generate

# 3. the same with LAUNCHER=mpirun (the venv's mpirun inside the allocation, as root)
submit generate-mpirun --export="$COMMON,LAUNCHER=mpirun" -- generate --prompt "$PROMPT" --json
expect_state generate-mpirun "COMPLETED 0:0"
cp "$WORK/generate.ref" "$WORK/generate-mpirun.ref"
same_tokens generate-mpirun

# 4. a job that must fail: 2 tasks given the shard set of 4 ranks
TASKS=2 submit wrong-ranks --export="$COMMON" -- generate --prompt "$PROMPT"
expect_state wrong-ranks FAILED
if grep -q '^error: .*rank grid 2x2 (4 ranks) but 2 ranks' "$WORK/wrong-ranks.err"; then
    ok "wrong-ranks: the loader's error is in the job's log"
else
    not_ok "wrong-ranks: no rank-count error in the job's log" "$WORK/wrong-ranks.err"
fi

# 5. a job whose srun starts 4 singletons instead of one 4-rank MPI job
submit singletons --export="$COMMON,SRUN_MPI=pmi2" -- generate --prompt "$PROMPT"
expect_state singletons FAILED
if grep -q "^error: srun --mpi=pmi2 did not start one MPI job of $TASKS ranks" "$WORK/singletons.err"; then
    ok "singletons: the script's rank check is in the job's log"
else
    not_ok "singletons: no rank-check error in the job's log" "$WORK/singletons.err"
fi

# 6. batch: requests from a JSON-lines file (one of them bad), results appended to OUT
REQUESTS="$WORK/requests.jsonl"
cat > "$REQUESTS" <<END
{"id": "mesh", "prompt": "$PROMPT", "max_new_tokens": 10}
{"id": 2, "prompt_ids": [1, 5, 9], "max_new_tokens": 6}
this line is not JSON
{"id": "sampled", "prompt": "Once upon a time", "temperature": 0.8, "top_p": 0.9, "seed": 3}
END
IDS=(mesh 2 sampled)
RESULTS="$WORK/results.jsonl"
submit batch --export="$COMMON,OUT=$RESULTS" -- batch "$REQUESTS"
expect_state batch "COMPLETED 0:0"
reference batch generate --model "$SHARDS" --batch "$REQUESTS" --out "$WORK/batch.ref.jsonl" \
    --max-new-tokens "$NEW_TOKENS"
same_tokens batch "$RESULTS" "$WORK/batch.ref.jsonl" "${IDS[@]}"
if grep -q "requests.jsonl:3: .*skipped" "$WORK/batch.err"; then
    ok "batch: the bad line 3 is reported and skipped"
else
    not_ok "batch: no report of the bad line 3 in the job's log" "$WORK/batch.err"
fi

# 7. the batch job again, as after a kill while it wrote its second result: the finished request
#    is kept, the half-written line is cut off, and the other requests run again.
head -n 1 "$RESULTS" > "$WORK/results.first"
{ cat "$WORK/results.first"; sed -n 2p "$RESULTS" | head -c 40; } > "$WORK/results.partial"
cp "$WORK/results.partial" "$RESULTS"
submit batch-rerun --export="$COMMON,OUT=$RESULTS" -- batch "$REQUESTS"
expect_state batch-rerun "COMPLETED 0:0"
same_tokens batch-rerun "$RESULTS" "$WORK/batch.ref.jsonl" "${IDS[@]}"
if [[ "$(head -n 1 "$RESULTS")" == "$(cat "$WORK/results.first")" ]] &&
   grep -q "1 already in" "$WORK/batch-rerun.err"; then
    ok "batch-rerun: the finished request was kept, not run again"
else
    not_ok "batch-rerun: the first result was not kept as it was" "$WORK/batch-rerun.err"
fi

cleanup
echo "test-slurm: $passed passed, $failed failed"
[[ "$failed" == 0 ]]
