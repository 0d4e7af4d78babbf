#!/usr/bin/env bash
# make test-multihost: the runtime across 3 simulated hosts on this machine (tools/multihost.sh:
# a network namespace, host name, /dev/shm and IPC each, and in the second part a /tmp each),
# with the project's own Open MPI starting its daemons on the other hosts, over a private TCP
# network (no default route; Open MPI restricted to it).
#
# Checks, each with where the ranks ran (host per rank), not only the exit code:
#   shared /tmp:
#     - the MPI test suite on 2, 4 and 6 ranks spread over the hosts (MULTIHOST_SUITE_SIZES);
#     - generate, tiny model (a shard set and the HF directory itself) and SmolLM2 when it is in
#       the cache: the same tokens as on one host;
#     - jobs/mpirun.sh with a hostfile (by slot and by node), and its timeout naming the rank
#       and host that did not finish;
#   a /tmp per host (nothing in /tmp is shared):
#     - the shard and input tests of the suite on 4 ranks;
#     - convert --node-local then generate (jobs/mpirun.sh NODE_LOCAL=1): each host holds the
#       files of its ranks, the tokens are one host's; without --node-local, one clear error;
#     - a prompt file on rank 0's host only; an HF directory with other weights on one host;
#     - jobs/slurm.sbatch with -N 2 --ntasks 4 (slurmctld on h1, slurmd on h2 and h3), with srun
#       and with LAUNCHER=mpirun: 2+2 ranks, the same tokens (skipped with MULTIHOST_SLURM=0).
#
# Needs root, ip and unshare (iproute2, util-linux). Without them it says why and passes, unless
# REQUIRE_MULTIHOST=1 (CI), which makes that a failure. Everything it makes (namespaces,
# processes, files) is removed on exit, also on failure. Every launch runs under a timeout.
# Ends with "N passed, N failed" and the wall time.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PY="$REPO/.venv/bin/python"
MPIEXEC="$REPO/.venv/bin/mpiexec"
HOSTS="$REPO/tools/multihost.sh"
CLUSTER="$REPO/tools/slurm_cluster.sh"
LAUNCH_TIMEOUT="${LAUNCH_TIMEOUT:-120}"     # seconds for one launch (generate, a job script)
SUITE_TIMEOUT="${SUITE_TIMEOUT:-420}"       # seconds for one run of the MPI test suite
SUITE_SIZES="${MULTIHOST_SUITE_SIZES:-2 4 6}"
# On 6 ranks over 3 hosts (6 processes on this machine's cores, over TCP) the whole suite takes
# about 10 minutes; by default a part of it runs there: the control plane, collectives, fabric,
# relayout and host I/O kernels, the model on 2x3 and 3x2 rank grids, placement and shard sets.
# MULTIHOST_SUITE6=all runs everything.
SUITE6="${MULTIHOST_SUITE6:-tests/meshrt/test_control_plane.py tests/meshrt/test_collectives.py
    tests/meshrt/test_fabric.py tests/meshrt/test_relayout.py tests/meshrt/test_hostio_plmr.py
    tests/llm/engine/test_model_mesh.py tests/llm/placement tests/llm/storage}"
[[ "$SUITE6" == all ]] && SUITE6=""
MODEL=tests/fixtures/tiny-llama-gqa
PROMPT="the mesh passes the cache"
NEW_TOKENS=12
T0=$SECONDS

"$HOSTS" install || echo "test-multihost: installing iproute2 and util-linux failed"
if ! reason="$("$HOSTS" check 2>&1)"; then
    if [[ "${REQUIRE_MULTIHOST:-0}" == 1 ]]; then
        echo "test-multihost: cannot run ($reason), and REQUIRE_MULTIHOST=1"
        echo "test-multihost: 0 passed, 1 failed"
        exit 1
    fi
    echo "test-multihost: skipped: $reason"
    exit 0
fi
[[ -x "$PY" ]] || { echo "test-multihost: no $PY (run make install)"; exit 1; }

# Everything in one place per run, outside /tmp (which a host may have to itself).
export MULTIHOST_DIR="/var/tmp/waferllm-multihost-$$"
export MULTIHOST_PREFIX="wlmh$$"
WORK="$MULTIHOST_DIR.work"
export SLURM_TEST_DIR="$WORK/slurm"
mkdir -p "$WORK"
passed=0
failed=0
slurm_up=0
cleanup() {
    [[ -n "$WORK" ]] || return
    if [[ "$slurm_up" == 1 ]]; then "$CLUSTER" down >/dev/null 2>&1 || true; fi
    "$HOSTS" down || true
    if [[ "$failed" == 0 ]]; then rm -rf "$WORK"; else echo "test-multihost: logs kept in $WORK"; fi
    WORK=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=tests/checks.sh
source "$REPO/tests/checks.sh"

# Open MPI across the hosts: only what is set here (not the Makefile's one-host settings).
for var in $(env | sed -n 's/^\(OMPI_[A-Za-z0-9_]*\|PRTE_[A-Za-z0-9_]*\|PMIX_[A-Za-z0-9_]*\)=.*/\1/p'); do
    unset "$var"
done
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PATH="$REPO/.venv/bin:$PATH"

on() { "$HOSTS" exec "$@"; }

# Launches across the hosts go through the job scripts' bounded(): under a timeout, and a
# launcher that hangs after every rank ended (Open MPI 5, prrte#1389) is stopped after
# EXIT_GRACE seconds with the ranks' own status instead of failing the check.
# shellcheck source=jobs/launch.sh
source "$REPO/jobs/launch.sh"
# bounded_on_h1 SECONDS HOSTFILE N PROGRAM...: an N-rank job over HOSTFILE, launched on h1
bounded_on_h1() {
    local LAUNCH=("$HOSTS" exec h1 "$MPIEXEC" --hostfile "$2" -n "$3" --map-by slot)
    local TIMEOUT="$1" RANKS="$3"
    shift 3
    bounded "${LAUNCH[@]}" "$@"
}

# hostfile NAME "h1:2 h2:1 ...": write $WORK/NAME.hosts
hostfile() {
    local spec
    : > "$WORK/$1.hosts"
    for spec in $2; do echo "${spec%%:*} slots=${spec#*:}" >> "$WORK/$1.hosts"; done
    echo "$WORK/$1.hosts"
}

# across HOSTFILE N CMD...: CMD as an N-rank job over the hosts of HOSTFILE, started on h1
across() {
    bounded_on_h1 "$LAUNCH_TIMEOUT" "$@"
}

# one_host N CMD...: CMD as an N-rank job on h1 alone (shared memory)
one_host() {
    local n="$1"
    shift
    on h1 env OMPI_MCA_btl=self,sm OMPI_MCA_btl_tcp_if_include= OMPI_MCA_oob_tcp_if_include= \
        OMPI_MCA_rmaps_base_oversubscribe=true timeout -k 10 "$LAUNCH_TIMEOUT" "$MPIEXEC" -n "$n" \
        --map-by slot:oversubscribe "$@" </dev/null
}

PLACEMENT='import socket; from mpi4py import MPI
h = MPI.COMM_WORLD.gather(socket.gethostname())
print(" ".join(h) if MPI.COMM_WORLD.rank == 0 else "", end="")'

# placed NAME HOSTFILE N "h1 h1 h2 ...": the ranks of an N-rank job land on these hosts
placed() {
    local got
    got="$(across "$2" "$3" "$PY" -c "$PLACEMENT" 2>"$WORK/$1.placement.err")"
    if [[ "$got" == "$4" ]]; then
        ok "$1: ranks on $got"
        return 0
    fi
    not_ok "$1: ranks on '$got', expected '$4'" "$WORK/$1.placement.err"
    return 1
}

# same_tokens NAME OUT REF: the --json records agree
same_tokens() {
    local out
    if out="$(timeout 60 "$PY" tests/slurm/same_tokens.py "$2" "$3" 2>&1)"; then
        ok "$1: tokens equal one host's ($out)"
    else
        not_ok "$1: tokens differ from one host's: $out" "$WORK/$1.err"
    fi
}

# expect_error NAME RC LOG PHRASE...: the run failed with one error line holding every phrase
expect_error() {
    local name="$1" rc="$2" log="$3" phrase line
    shift 3
    line="$(tr -d '\0' < "$log" | grep -a '^error:' | head -n 2)"
    if [[ "$rc" == 0 || "$(grep -c . <<< "$line")" != 1 ]]; then
        not_ok "$name: expected a failure with one error line (exit $rc)" "$log"
        return
    fi
    for phrase in "$@"; do
        [[ "$line" == *"$phrase"* ]] || { not_ok "$name: '$phrase' not in: $line" "$log"; return; }
    done
    ok "$name: $line"
}

# ------------------------------------------------------------------------------------------
echo "== 3 hosts, shared /tmp"
if ! "$HOSTS" up 3 > "$WORK/up.log" 2>&1; then
    not_ok "3 simulated hosts come up" "$WORK/up.log"
    echo "test-multihost: $passed passed, $failed failed"
    exit 1
fi
eval "$("$HOSTS" env)"
export OMPI_MCA_btl=self,sm,tcp

# 1. the MPI test suite across the hosts
for n in $SUITE_SIZES; do
    case "$n" in
        2) spec="h1:1 h2:1" want="h1 h2" ;;
        4) spec="h1:2 h2:1 h3:1" want="h1 h1 h2 h3" ;;
        6) spec="h1:2 h2:2 h3:2" want="h1 h1 h2 h2 h3 h3" ;;
        *) echo "MULTIHOST_SUITE_SIZES: 2, 4 or 6, not $n"; exit 2 ;;
    esac
    hf="$(hostfile "suite$n" "$spec")"
    placed "suite-$n" "$hf" "$n" "$want" || continue
    t=$SECONDS
    part=()
    # shellcheck disable=SC2206
    [[ "$n" != 6 ]] || part=($SUITE6)
    bounded_on_h1 "$SUITE_TIMEOUT" "$hf" "$n" "$PY" jobs/rank.py -m pytest -q --only-mpi --color=no \
        -p no:cacheprovider ${part[@]+"${part[@]}"} > "$WORK/suite-$n.log" 2>&1
    rc=$?
    summary="$(tr -d '\0' < "$WORK/suite-$n.log" | grep -aE '^[0-9]+ passed' | tail -n 1)"
    if [[ "$rc" == 0 && -n "$summary" && "$summary" != *failed* ]]; then
        ok "suite-$n${part[0]:+ (part)}: $summary on ${want// /,} ($((SECONDS - t)) s)"
    else
        not_ok "suite-$n: exit $rc after $((SECONDS - t)) s (${summary:-no summary})" "$WORK/suite-$n.log"
    fi
done

# 2. generate across hosts against one host
SH4="$WORK/tiny-4r"
one_host 4 "$PY" -m mpi4py -m llm convert "$MODEL" --out "$SH4" --decode-mesh 4x4 -q \
    > "$WORK/convert.log" 2>&1 || not_ok "convert on h1 (4 processes)" "$WORK/convert.log"
GEN=(generate --prompt "$PROMPT" --max-new-tokens "$NEW_TOKENS" --json)
one_host 4 "$PY" -m mpi4py -m llm "${GEN[@]}" --model "$SH4" > "$WORK/ref.out" 2> "$WORK/ref.err" \
    || not_ok "generate on h1 alone" "$WORK/ref.err"
hf="$(hostfile gen "h1:2 h2:1 h3:1")"
if placed generate "$hf" 4 "h1 h1 h2 h3"; then
    across "$hf" 4 "$PY" -m mpi4py -m llm "${GEN[@]}" --model "$SH4" > "$WORK/gen.out" 2> "$WORK/gen.err"
    same_tokens "generate-shards" "$WORK/gen.out" "$WORK/ref.out"
    # the HF directory itself (each rank reads and hashes the safetensors)
    one_host 4 "$PY" -m mpi4py -m llm "${GEN[@]}" --model "$MODEL" --decode-mesh 4x4 \
        > "$WORK/ref-hf.out" 2> "$WORK/ref-hf.err"
    across "$hf" 4 "$PY" -m mpi4py -m llm "${GEN[@]}" --model "$MODEL" --decode-mesh 4x4 \
        > "$WORK/gen-hf.out" 2> "$WORK/gen-hf.err"
    same_tokens "generate-hf" "$WORK/gen-hf.out" "$WORK/ref-hf.out"
fi

# SmolLM2, when it is in the cache (make model); nothing is downloaded here
GGUF="$(find "${WAFERLLM_CACHE:-$HOME/.cache/waferllm}" -name 'SmolLM2*.gguf' 2>/dev/null | head -n 1)"
if [[ -n "$GGUF" ]]; then
    SM="$WORK/smollm2-4r"
    SGEN=(generate --prompt "The capital of France is" --max-new-tokens 8 --json --model "$SM")
    one_host 4 "$PY" -m mpi4py -m llm convert "$GGUF" --out "$SM" --decode-mesh 4x4 -q \
        > "$WORK/smollm2-convert.log" 2>&1 || not_ok "convert SmolLM2 on h1" "$WORK/smollm2-convert.log"
    one_host 4 "$PY" -m mpi4py -m llm "${SGEN[@]}" > "$WORK/smollm2-ref.out" 2> "$WORK/smollm2-ref.err"
    across "$hf" 4 "$PY" -m mpi4py -m llm "${SGEN[@]}" > "$WORK/smollm2.out" 2> "$WORK/smollm2.err"
    same_tokens "generate-smollm2" "$WORK/smollm2.out" "$WORK/smollm2-ref.out"
    rm -rf "$SM"
else
    echo "skip   generate-smollm2: not in the cache (make model)"
fi

# 3. jobs/mpirun.sh with a hostfile
JOBENV=(RANKS=4 SHARDS="$SH4" DECODE_MESH=4x4 MAX_NEW_TOKENS="$NEW_TOKENS" TIMEOUT="$LAUNCH_TIMEOUT")
hf="$(hostfile jobs "h1:2 h2:2 h3:2")"
# mpirun_job NAME WANT-PLACEMENT [NAME=VALUE ...]: generate through jobs/mpirun.sh from h1
mpirun_job() {
    local name="$1" want="$2" got
    shift 2
    on h1 timeout -k 10 $((LAUNCH_TIMEOUT + 60)) env "${JOBENV[@]}" HOSTFILE="$hf" "$@" \
        jobs/mpirun.sh generate --prompt "$PROMPT" --json </dev/null > "$WORK/$name.out" 2> "$WORK/$name.err"
    got="$(sed -n 's/^placement: //p' "$WORK/$name.err")"
    if [[ "$got" == "$want" ]]; then
        ok "$name: placement: $got"
        same_tokens "$name" "$WORK/$name.out" "$WORK/ref.out"
    else
        not_ok "$name: placement '$got', expected '$want'" "$WORK/$name.err"
    fi
}
mpirun_job mpirun-slot "4 ranks on 2 host(s): h1 ranks 0-1, h2 ranks 2-3"
mpirun_job mpirun-node "4 ranks on 3 host(s): h1 ranks 0,3, h2 ranks 1, h3 ranks 2" MAP_BY=node

# its timeout names the rank that did not finish, and its host: rank 3 (on h2) never starts
cat > "$WORK/slow-python" <<EOF
#!/bin/sh
case " \$* " in *" $REPO/jobs/rank.py "*) [ "\$OMPI_COMM_WORLD_RANK" = 3 ] && exec sleep 600 ;; esac
exec "$PY" "\$@"
EOF
chmod +x "$WORK/slow-python"
t=$SECONDS
on h1 timeout -k 10 120 env "${JOBENV[@]}" HOSTFILE="$hf" TIMEOUT=10 PYTHON="$WORK/slow-python" \
    MPIEXEC="$MPIEXEC" jobs/mpirun.sh generate --prompt "$PROMPT" </dev/null \
    > "$WORK/mpirun-timeout.out" 2> "$WORK/mpirun-timeout.err"
rc=$?
if [[ "$rc" != 0 ]] && (( SECONDS - t < 60 )) &&
   grep -q '^error: timed out after 10 s (TIMEOUT=): not finished: .*rank 3 on h2' "$WORK/mpirun-timeout.err"; then
    ok "mpirun-timeout: exit $rc after $((SECONDS - t)) s: $(grep '^error: timed out' "$WORK/mpirun-timeout.err")"
else
    not_ok "mpirun-timeout: exit $rc after $((SECONDS - t)) s, no error naming rank 3 on h2" \
        "$WORK/mpirun-timeout.err"
fi

"$HOSTS" down

# ------------------------------------------------------------------------------------------
echo "== 3 hosts, each with its own /tmp"
if ! "$HOSTS" up 3 --private-tmp > "$WORK/up-private.log" 2>&1; then
    not_ok "3 simulated hosts with a /tmp each come up" "$WORK/up-private.log"
    echo "test-multihost: $passed passed, $failed failed"
    exit 1
fi

# 4. the shard and input tests on 4 ranks: shared files only where the tests ask for them
hf="$(hostfile private "h1:2 h2:2")"
mkdir -p "$WORK/shared"
t=$SECONDS
export WAFERLLM_TEST_SHARED_DIR="$WORK/shared"
bounded_on_h1 "$SUITE_TIMEOUT" "$hf" 4 "$PY" jobs/rank.py \
    -m pytest -q --only-mpi --color=no -p no:cacheprovider tests/llm/storage \
    tests/llm/cli/test_chat_input_mpi.py > "$WORK/private-suite.log" 2>&1
rc=$?
summary="$(tr -d '\0' < "$WORK/private-suite.log" | grep -aE '^[0-9]+ passed' | tail -n 1)"
if [[ "$rc" == 0 && -n "$summary" && "$summary" != *failed* ]]; then
    ok "private-tmp suite (storage, chat input) on h1,h1,h2,h2: $summary ($((SECONDS - t)) s)"
else
    not_ok "private-tmp suite: exit $rc (${summary:-no summary})" "$WORK/private-suite.log"
fi

# 5. node-local shard sets through jobs/mpirun.sh, in /tmp of each host
NL=/tmp/waferllm-node-local
NLENV=(RANKS=4 SHARDS="$NL" DECODE_MESH=4x4 MAX_NEW_TOKENS="$NEW_TOKENS" TIMEOUT="$LAUNCH_TIMEOUT" HOSTFILE="$hf")
on h1 timeout -k 10 $((LAUNCH_TIMEOUT + 60)) env "${NLENV[@]}" jobs/mpirun.sh convert -q </dev/null \
    > "$WORK/shared-convert.out" 2> "$WORK/shared-convert.err"
expect_error "convert-unshared" $? "$WORK/shared-convert.err" "not visible on every rank" "--node-local"
on h1 timeout -k 10 $((LAUNCH_TIMEOUT + 60)) env "${NLENV[@]}" NODE_LOCAL=1 jobs/mpirun.sh \
    generate --prompt "$PROMPT" --json </dev/null > "$WORK/node-local.out" 2> "$WORK/node-local.err"
files="$(for h in h1 h2 h3; do echo "$h: $(on "$h" sh -c "cd $NL 2>/dev/null && ls rank*.h5 manifest.json" | paste -sd' ' -)"; done)"
want_files="h1: manifest.json rank000x000.h5 rank000x001.h5
h2: manifest.json rank001x000.h5 rank001x001.h5
h3: "
if [[ "$files" == "$want_files" ]]; then
    ok "node-local: each host holds its ranks' files and the manifest ($(echo "$files" | paste -sd';' -))"
    same_tokens node-local "$WORK/node-local.out" "$WORK/ref.out"
else
    not_ok "node-local: files per host: $(echo "$files" | paste -sd';' -)" "$WORK/node-local.err"
fi

# 6. inputs: a prompt file on rank 0's host only (another text on h2); an HF directory whose
#    weights differ on h2
on h1 sh -c "printf '%s' '$PROMPT' > /tmp/prompt.txt"
on h2 sh -c "printf 'another prompt, longer than the first one' > /tmp/prompt.txt"
across "$hf" 4 "$PY" -m mpi4py -m llm generate --model "$SH4" --prompt-file /tmp/prompt.txt \
    --max-new-tokens "$NEW_TOKENS" --json > "$WORK/prompt-file.out" 2> "$WORK/prompt-file.err"
same_tokens prompt-file-rank-0 "$WORK/prompt-file.out" "$WORK/ref.out"
for h in h1 h2; do on "$h" cp -r "$MODEL" /tmp/hf; done
on h2 "$PY" -c 'import sys, numpy as np
from safetensors.numpy import load_file, save_file
p = "/tmp/hf/model.safetensors"; t = load_file(p)
n = sorted(k for k in t if k.endswith("down_proj.weight"))[0]
t[n] = (t[n] * np.float32(1.5)).astype(t[n].dtype); save_file(t, p)'
across "$hf" 4 "$PY" -m mpi4py -m llm generate --model /tmp/hf --decode-mesh 4x4 --prompt "$PROMPT" \
    --max-new-tokens 2 > "$WORK/hf-differs.out" 2> "$WORK/hf-differs.err"
expect_error hf-weights-differ $? "$WORK/hf-differs.err" "on rank 2:" "model.safetensors differs from rank 0's"

# 7. jobs/slurm.sbatch -N 2 --ntasks 4: slurmctld on h1, slurmd on h2 and h3, each node with its
#    2 cores (as the simulated hosts have), /tmp of its own (Slurm's PMIx plugin keeps a directory
#    per job step there, named alike on every node)
slurm_job() {
    local name="$1" want="$2" job deadline state got
    shift 2
    job="$(on h1 timeout 30 sbatch --parsable -N 2 --ntasks 4 --job-name="$name" \
           --output="$WORK/$name.out" --error="$WORK/$name.err" \
           --export="ALL,SHARDS=$SH4,DECODE_MESH=4x4,MAX_NEW_TOKENS=$NEW_TOKENS,TIMEOUT=$LAUNCH_TIMEOUT$*" \
           jobs/slurm.sbatch generate --prompt "$PROMPT" --json </dev/null)"
    job="${job%%;*}"
    if [[ -z "$job" ]]; then not_ok "$name: sbatch failed"; return; fi
    deadline=$((SECONDS + LAUNCH_TIMEOUT + 60))
    while [[ -n "$(on h1 timeout 10 squeue -h -j "$job" -o %T 2>/dev/null)" ]]; do
        if (( SECONDS >= deadline )); then
            on h1 timeout 10 scancel "$job" || true
            not_ok "$name: job $job still running after $((LAUNCH_TIMEOUT + 60)) s" "$WORK/$name.err"
            return
        fi
        sleep 0.5
    done
    state="$(on h1 timeout 10 scontrol show job "$job" |
             sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p; s/.*[^a-zA-Z]ExitCode=\([0-9:]*\).*/\1/p' | paste -sd' ' -)"
    got="$(sed -n 's/^placement: //p' "$WORK/$name.err")"
    if [[ "$state" != "COMPLETED 0:0" ]]; then
        not_ok "$name: job $job ended '$state'" "$WORK/$name.err"
    elif [[ "$got" != "$want" ]]; then
        not_ok "$name: placement '$got', expected '$want'" "$WORK/$name.err"
    else
        ok "$name: job $job $state, placement: $got"
        same_tokens "$name" "$WORK/$name.out" "$WORK/ref.out"
    fi
}
if [[ "${MULTIHOST_SLURM:-1}" == 0 ]]; then
    echo "skip   slurm: MULTIHOST_SLURM=0"
elif ! timeout -k 10 600 "$CLUSTER" install > "$WORK/slurm-install.log" 2>&1; then
    not_ok "slurm: installing slurm-wlm, munge, libpmix2" "$WORK/slurm-install.log"
else
    slurm_up=1
    if SLURM_TEST_HOSTS="h1=10.77.0.1 h2=10.77.0.2 h3=10.77.0.3" SLURM_TEST_EXEC="$HOSTS exec" \
            SLURM_TEST_CPUS=2 timeout -k 10 120 "$CLUSTER" up > "$WORK/slurm-up.log" 2>&1; then
        export SLURM_CONF="$SLURM_TEST_DIR/slurm.conf"
        ok "slurm: $(tail -n 2 "$WORK/slurm-up.log" | head -n 1 | sed 's/^slurm_cluster: //')"
        slurm_job slurm-srun "4 ranks on 2 host(s): h2 ranks 0-1, h3 ranks 2-3"
        slurm_job slurm-mpirun "4 ranks on 2 host(s): h2 ranks 0-1, h3 ranks 2-3" ",LAUNCHER=mpirun"
    else
        not_ok "slurm: the cluster comes up on h1 (slurmctld), h2 and h3 (slurmd)" \
            "$WORK/slurm-up.log" "$SLURM_TEST_DIR"/log/*.log
    fi
    SLURM_TEST_HOSTS="h1=10.77.0.1 h2=10.77.0.2 h3=10.77.0.3" SLURM_TEST_EXEC="$HOSTS exec" \
        "$CLUSTER" down > "$WORK/slurm-down.log" 2>&1 || true
    slurm_up=0
fi
cleanup
echo "test-multihost: $passed passed, $failed failed in $((SECONDS - T0)) s"
[[ "$failed" == 0 ]]
