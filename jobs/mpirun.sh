#!/usr/bin/env bash
# Run `python -m llm` under mpiexec on a machine without SLURM (a workstation, a cloud VM, or
# hosts listed in a hostfile).
#
# Usage:
#   jobs/mpirun.sh [NAME=VALUE ...] COMMAND [extra arguments for python -m llm COMMAND ...]
#
# COMMAND:
#   convert   convert MODEL into the shard set SHARDS for RANKS ranks
#   generate  convert first (unless SHARDS already exists; FORCE=1 converts again), then generate
#   batch     `batch REQUESTS.jsonl [generate options]`: convert if needed, then run every request
#             of the file with `generate --batch`, appending results to OUT; a rerun skips the
#             requests already there (see jobs/requests.example.jsonl)
#   bench     benchmark PRESET with random weights (or, if MODEL is set, convert it and
#             benchmark the shard set)
#
# Parameters (environment variables, or NAME=VALUE arguments before COMMAND; defaults in []):
#   RANKS          MPI ranks [4]
#   MODEL          HF model directory or random:PRESET [tests/fixtures/tiny-llama-gqa]
#   SHARDS         shard directory; a relative path is taken from the directory you run this in
#                  [<repository>/shards/<model>-<DTYPE>-r<RANK_GRID or RANKS>-p<PREFILL_MESH>-
#                  d<DECODE_MESH>[-<LAYERS>l]: every setting that changes the files is in the name]
#   DECODE_MESH    decode virtual mesh, PYxPX [8x8]
#   PREFILL_MESH   prefill virtual mesh [as the decode mesh]
#   RANK_GRID      rank grid RYxRX [the squarest grid that divides the meshes]
#   DTYPE          float32 | float16 | bfloat16 storage [float32]
#   LAYERS         keep only the first N layers [all]
#   FORCE          1 = replace an existing shard set [0]
#   NODE_LOCAL     1 = SHARDS is on each host's own disk: convert --node-local writes there the
#                  files of the ranks that host runs, and the manifest [0]
#   PROMPT         prompt text [Once upon a time]; PROMPT_IDS (e.g. 1,450,4996) instead
#   MAX_NEW_TOKENS tokens to generate [32]
#   OUT            batch: results file [<repository>/out/<REQUESTS name without .jsonl>.results.jsonl]
#   PRESET         bench: model shapes [llama-100m]
#   PYTHON         interpreter [.venv/bin/python if present, else python3]
#   MPIEXEC        launcher [mpiexec next to PYTHON if present, else mpiexec]
#   HOSTFILE       hostfile for several hosts, "HOST slots=N" per line [none: this host only];
#                  every host must see the repository, PYTHON and the model (or, for a shard set
#                  converted with --node-local, its own rank files) at the same paths
#   MAP_BY         slot (fill each host's slots in turn) or node (round robin) [slot]
#   OVERSUBSCRIBE  1 = more ranks than slots or cores; auto = only on this host alone when it
#                  has fewer cores than RANKS x THREADS [auto]
#   TIMEOUT        seconds each launch may take; then it is stopped and the ranks that did not
#                  finish are named with their hosts [3600]
#   CHECK_PLACEMENT  1 = first print where the ranks run (and warn if a job given several hosts
#                  has them all on one) [1]
#   MPIEXEC_ARGS   extra launcher arguments [none]
#   THREADS        BLAS threads per rank [1]
#   Across hosts Open MPI uses TCP (OMPI_MCA_btl=self,sm,tcp; restrict the interfaces with
#   OMPI_MCA_btl_tcp_if_include); on one host shared memory only (self,sm).
#   DRY_RUN        1 = print the commands instead of running them [0]
#
# Examples (the first three fit a 2-core machine with a few GB free):
#   jobs/mpirun.sh convert                       # the tiny fixture model, 4 ranks: seconds
#   RANKS=2 DECODE_MESH=4x4 jobs/mpirun.sh generate --prompt-ids 1,5,9 --max-new-tokens 8
#   DECODE_MESH=4x4 jobs/mpirun.sh batch jobs/requests.example.jsonl
#   jobs/mpirun.sh PRESET=llama-100m bench --json --repeat 1    # ~100M random weights, 4 ranks:
#                                                # about 2 GB and 2 minutes on 2 cores
#   # LLaMA3-8B shapes, 1 layer: each rank places only its own tiles in bfloat16 and never the
#   # embedding table (1.6 GB per rank measured on 420x420 with 2 ranks); minutes on 2 cores
#   jobs/mpirun.sh RANKS=4 PRESET=llama3-8b LAYERS=1 DECODE_MESH=64x64 bench --json
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

while [[ $# -gt 0 && "$1" == [A-Z_]*=* ]]; do
    export "${1?}"
    shift
done
if [[ $# -lt 1 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
COMMAND="$1"
shift
case "$COMMAND" in
    convert|generate|bench) ;;
    batch)
        if [[ $# -lt 1 || ! -f "$1" ]]; then
            echo "error: batch needs a requests file (JSON lines), as in: batch REQUESTS.jsonl" \
                 "[generate options]${1:+ (there is no file '$1')}" >&2
            exit 2
        fi
        REQUESTS="$1"
        shift
        ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown command '$COMMAND' (convert, generate, batch or bench)" >&2; exit 2 ;;
esac

RANKS="${RANKS:-4}"
MODEL_GIVEN="${MODEL:-}"
MODEL="${MODEL:-$REPO/tests/fixtures/tiny-llama-gqa}"
DECODE_MESH="${DECODE_MESH:-8x8}"
PREFILL_MESH="${PREFILL_MESH:-}"
RANK_GRID="${RANK_GRID:-}"
DTYPE="${DTYPE:-float32}"
LAYERS="${LAYERS:-}"
FORCE="${FORCE:-0}"
NODE_LOCAL="${NODE_LOCAL:-0}"
PROMPT="${PROMPT:-Once upon a time}"
PROMPT_IDS="${PROMPT_IDS:-}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-32}"
PRESET="${PRESET:-llama-100m}"
THREADS="${THREADS:-1}"
DRY_RUN="${DRY_RUN:-0}"
OVERSUBSCRIBE="${OVERSUBSCRIBE:-auto}"
MAP_BY="${MAP_BY:-slot}"
TIMEOUT="${TIMEOUT:-3600}"
CHECK_PLACEMENT="${CHECK_PLACEMENT:-1}"
model_name="$(basename "${MODEL#random:}")"
# In the repository (not the caller's directory), named by everything that changes the files, so
# a later run never silently reuses a shard set made with other settings.
SHARDS="${SHARDS:-$REPO/shards/${model_name}-${DTYPE}-r${RANK_GRID:-$RANKS}-p${PREFILL_MESH:-$DECODE_MESH}-d${DECODE_MESH}${LAYERS:+-${LAYERS}l}}"
if [[ "$COMMAND" == batch ]]; then
    requests_name="$(basename "$REQUESTS")"
    OUT="${OUT:-$REPO/out/${requests_name%.jsonl}.results.jsonl}"
fi

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "${MPIEXEC:-}" ]]; then
    venv_mpiexec="$(dirname "$(command -v "$PYTHON")")/mpiexec"
    if [[ -x "$venv_mpiexec" ]]; then MPIEXEC="$venv_mpiexec"; else MPIEXEC=mpiexec; fi
fi

# shellcheck source=jobs/launch.sh
source "$REPO/jobs/launch.sh"
# Cores here, read before OMP_NUM_THREADS is set (GNU nproc obeys it).
CORES="$(available_cores)"
# One BLAS thread per rank unless asked otherwise (ranks x threads must not exceed the cores).
export OPENBLAS_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
export PYTHONUNBUFFERED=1
# Open MPI refuses to run as root unless told (containers, CI).
if [[ "$(id -u)" == 0 ]]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# Hosts of the hostfile (one per line, "host [slots=N]", # comments) and their slots.
HOSTS_GIVEN=1
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -r "$HOSTFILE" ]] || { echo "error: HOSTFILE=$HOSTFILE: no such file" >&2; exit 2; }
    HOSTS_GIVEN="$(sed 's/#.*//' "$HOSTFILE" | awk 'NF {print $1}' | sort -u | wc -l)"
    slots="$(sed 's/#.*//' "$HOSTFILE" | awk 'NF { if (match($0, /slots=[0-9]+/)) s += substr($0, RSTART + 6, RLENGTH - 6); else u = 1 }
                                             END { print (u ? "" : s + 0) }')"
    if [[ -n "$slots" && "$slots" -lt "$RANKS" && "$OVERSUBSCRIBE" != 1 ]]; then
        echo "error: HOSTFILE=$HOSTFILE gives $slots slots for $RANKS ranks: add slots, or set" \
             "OVERSUBSCRIBE=1 to run more ranks than slots" >&2
        exit 2
    fi
fi
# More ranks than cores only when asked, or on this host alone when it has fewer cores.
if [[ "$OVERSUBSCRIBE" == auto ]]; then
    OVERSUBSCRIBE=0
    if [[ "$HOSTS_GIVEN" == 1 && -z "${HOSTFILE:-}" ]] && (( RANKS * THREADS > CORES )); then
        OVERSUBSCRIBE=1
    fi
fi
map="$MAP_BY"
if [[ "$OVERSUBSCRIBE" == 1 ]]; then
    map="$map:oversubscribe"
    export OMPI_MCA_rmaps_base_oversubscribe=true
    # waiting ranks yield the CPU to the ranks that compute instead of spinning
    export OMPI_MCA_mpi_yield_when_idle="${OMPI_MCA_mpi_yield_when_idle:-1}"
fi
LAUNCH=("$MPIEXEC" -n "$RANKS" --map-by "$map")
[[ -n "${HOSTFILE:-}" ]] && LAUNCH+=(--hostfile "$HOSTFILE")
if [[ "$HOSTS_GIVEN" == 1 ]]; then
    # one host: shared-memory transport only, which also avoids a slow start-up probe
    export OMPI_MCA_pml="${OMPI_MCA_pml:-ob1}" OMPI_MCA_btl="${OMPI_MCA_btl:-self,sm}"
else
    # several hosts: TCP between them (a site's faster network: set OMPI_MCA_btl yourself)
    case "${OMPI_MCA_btl:-}" in ""|self,sm|sm,self) export OMPI_MCA_btl=self,sm,tcp ;; esac
    export OMPI_MCA_pml="${OMPI_MCA_pml:-ob1}"
fi
# tile messages up to 128 KB go eagerly, without a rendezvous round trip (default 4 KB)
export OMPI_MCA_btl_sm_eager_limit="${OMPI_MCA_btl_sm_eager_limit:-131072}"
export OMPI_MCA_btl_sm_max_send_size="${OMPI_MCA_btl_sm_max_send_size:-131072}"
# shellcheck disable=SC2206
LAUNCH+=(${MPIEXEC_ARGS:-})
# jobs/rank.py is `python -m mpi4py` that also says when the program reached its end
LLM=("${LAUNCH[@]}" "$PYTHON" "$REPO/jobs/rank.py" -m llm)

run() {
    { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2
    if [[ "$DRY_RUN" != 1 ]]; then
        bounded "$@"
    fi
}

mesh_args=(--decode-mesh "$DECODE_MESH")
[[ -n "$PREFILL_MESH" ]] && mesh_args+=(--prefill-mesh "$PREFILL_MESH")
[[ -n "$RANK_GRID" ]] && mesh_args+=(--ranks "$RANK_GRID")

convert() {
    local args=(convert "$MODEL" --out "$SHARDS" --dtype "$DTYPE" "${mesh_args[@]}")
    [[ -n "$LAYERS" ]] && args+=(--layers "$LAYERS")
    [[ "$FORCE" == 1 ]] && args+=(--force)
    [[ "$NODE_LOCAL" == 1 ]] && args+=(--node-local)
    run "${LLM[@]}" "${args[@]}" "$@"
}

convert_if_needed() {
    if [[ -f "$SHARDS/manifest.json" && "$FORCE" != 1 ]]; then
        echo "using the existing shard set $SHARDS (FORCE=1 converts again)" >&2
    else
        convert
    fi
}

[[ "$DRY_RUN" == 1 || "$CHECK_PLACEMENT" != 1 ]] || check_placement
case "$COMMAND" in
    convert)
        convert "$@"
        ;;
    generate)
        convert_if_needed
        prompt=(--prompt "$PROMPT")
        [[ -n "$PROMPT_IDS" ]] && prompt=(--prompt-ids "$PROMPT_IDS")
        for arg in "$@"; do    # a prompt among the extra arguments wins
            case "$arg" in --prompt|--prompt=*|--prompt-ids*|--prompt-file*|--chat*|--batch*) prompt=() ;; esac
        done
        run "${LLM[@]}" generate --model "$SHARDS" ${prompt[@]+"${prompt[@]}"} \
            --max-new-tokens "$MAX_NEW_TOKENS" "$@"
        ;;
    batch)
        convert_if_needed
        [[ "$DRY_RUN" == 1 ]] || mkdir -p "$(dirname "$OUT")"
        run "${LLM[@]}" generate --model "$SHARDS" --batch "$REQUESTS" --out "$OUT" \
            --max-new-tokens "$MAX_NEW_TOKENS" "$@"
        echo "results in $OUT" >&2
        ;;
    bench)
        if [[ -n "$MODEL_GIVEN" ]]; then
            convert_if_needed
            run "${LLM[@]}" bench --model "$SHARDS" "${mesh_args[@]}" "$@"
        else
            args=(bench --preset "$PRESET" "${mesh_args[@]}")
            [[ -n "$LAYERS" ]] && args+=(--layers "$LAYERS")
            run "${LLM[@]}" "${args[@]}" "$@"
        fi
        ;;
esac
