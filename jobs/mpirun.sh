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
#   PROMPT         prompt text [Once upon a time]; PROMPT_IDS (e.g. 1,450,4996) instead
#   MAX_NEW_TOKENS tokens to generate [32]
#   OUT            batch: results file [<repository>/out/<REQUESTS name without .jsonl>.results.jsonl]
#   PRESET         bench: model shapes [llama-100m]
#   PYTHON         interpreter [.venv/bin/python if present, else python3]
#   MPIEXEC        launcher [mpiexec next to PYTHON if present, else mpiexec]
#   HOSTFILE       hostfile for several hosts [none: this host only]
#   MPIEXEC_ARGS   extra launcher arguments [none]
#   THREADS        BLAS threads per rank [1]
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
PROMPT="${PROMPT:-Once upon a time}"
PROMPT_IDS="${PROMPT_IDS:-}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-32}"
PRESET="${PRESET:-llama-100m}"
THREADS="${THREADS:-1}"
DRY_RUN="${DRY_RUN:-0}"
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

# One BLAS thread per rank unless asked otherwise (ranks x threads must not exceed the cores).
export OPENBLAS_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
export PYTHONUNBUFFERED=1
# Open MPI refuses to run as root, and more ranks than cores, unless told (containers, CI).
if [[ "$(id -u)" == 0 ]]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    export PRTE_MCA_rmaps_default_mapping_policy="${PRTE_MCA_rmaps_default_mapping_policy:-:oversubscribe}"
fi
if [[ "$RANKS" -gt "$(nproc 2>/dev/null || echo 1)" ]]; then
    export PRTE_MCA_rmaps_default_mapping_policy="${PRTE_MCA_rmaps_default_mapping_policy:-:oversubscribe}"
    export OMPI_MCA_rmaps_base_oversubscribe="${OMPI_MCA_rmaps_base_oversubscribe:-true}"
fi
LAUNCH=("$MPIEXEC" -n "$RANKS")
if [[ -n "${HOSTFILE:-}" ]]; then
    LAUNCH+=(--hostfile "$HOSTFILE")
else
    # one host: shared-memory transport only, which also avoids a slow start-up probe
    export OMPI_MCA_pml="${OMPI_MCA_pml:-ob1}" OMPI_MCA_btl="${OMPI_MCA_btl:-self,sm}"
    # tile messages up to 128 KB go eagerly, without a rendezvous round trip (default 4 KB)
    export OMPI_MCA_btl_sm_eager_limit="${OMPI_MCA_btl_sm_eager_limit:-131072}"
    export OMPI_MCA_btl_sm_max_send_size="${OMPI_MCA_btl_sm_max_send_size:-131072}"
fi
# shellcheck disable=SC2206
LAUNCH+=(${MPIEXEC_ARGS:-} "$PYTHON" -m mpi4py -m llm)

run() {
    { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2
    if [[ "$DRY_RUN" != 1 ]]; then
        "$@" </dev/null
    fi
}

mesh_args=(--decode-mesh "$DECODE_MESH")
[[ -n "$PREFILL_MESH" ]] && mesh_args+=(--prefill-mesh "$PREFILL_MESH")
[[ -n "$RANK_GRID" ]] && mesh_args+=(--ranks "$RANK_GRID")

convert() {
    local args=(convert "$MODEL" --out "$SHARDS" --dtype "$DTYPE" "${mesh_args[@]}")
    [[ -n "$LAYERS" ]] && args+=(--layers "$LAYERS")
    [[ "$FORCE" == 1 ]] && args+=(--force)
    run "${LAUNCH[@]}" "${args[@]}" "$@"
}

convert_if_needed() {
    if [[ -f "$SHARDS/manifest.json" && "$FORCE" != 1 ]]; then
        echo "using the existing shard set $SHARDS (FORCE=1 converts again)" >&2
    else
        convert
    fi
}

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
        run "${LAUNCH[@]}" generate --model "$SHARDS" ${prompt[@]+"${prompt[@]}"} \
            --max-new-tokens "$MAX_NEW_TOKENS" "$@"
        ;;
    batch)
        convert_if_needed
        [[ "$DRY_RUN" == 1 ]] || mkdir -p "$(dirname "$OUT")"
        run "${LAUNCH[@]}" generate --model "$SHARDS" --batch "$REQUESTS" --out "$OUT" \
            --max-new-tokens "$MAX_NEW_TOKENS" "$@"
        echo "results in $OUT" >&2
        ;;
    bench)
        if [[ -n "$MODEL_GIVEN" ]]; then
            convert_if_needed
            run "${LAUNCH[@]}" bench --model "$SHARDS" "${mesh_args[@]}" "$@"
        else
            args=(bench --preset "$PRESET" "${mesh_args[@]}")
            [[ -n "$LAYERS" ]] && args+=(--layers "$LAYERS")
            run "${LAUNCH[@]}" "${args[@]}" "$@"
        fi
        ;;
esac
