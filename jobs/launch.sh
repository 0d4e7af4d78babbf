# Shared by jobs/mpirun.sh and jobs/slurm.sbatch (sourced, not run): where the ranks run, and
# launches bounded in time that say which rank did not finish.
#
# The caller sets LAUNCH (the launcher and its arguments, up to the program), RANKS, PYTHON,
# TIMEOUT (seconds per launch) and HOSTS_GIVEN (how many hosts the job was given).
# shellcheck shell=bash

# Cores this process may use. GNU nproc obeys OMP_NUM_THREADS, so ask it without that.
available_cores() {
    env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1
}

# Seconds a launcher may take to exit once every rank has finished: Open MPI 5 sometimes waits
# for ever after a job across hosts has ended (prrte#1389).
EXIT_GRACE="${EXIT_GRACE:-20}"

# rank R's host, filled by check_placement
RANK_HOSTS=()

_PLACEMENT_PY='
import socket
from mpi4py import MPI
comm = MPI.COMM_WORLD
hosts = comm.gather(socket.gethostname(), root=0)
if comm.rank == 0:
    print("world", comm.size)
    for r, h in enumerate(hosts):
        print("rank", r, h)
'

# Ranks as "0-1,4" from a list of numbers in increasing order.
_rank_ranges() {
    awk '{ for (i = 1; i <= NF; i++) { r = $i
             if (n && r == last + 1) { last = r; continue }
             if (n) out = out (first == last ? first : first "-" last) ","
             first = r; last = r; n++ }
           if (n) out = out (first == last ? first : first "-" last); print out }' <<< "$*"
}

# One MPI job of RANKS ranks, and where its ranks run: launches a few lines of Python with the
# same launcher, prints the placement ("placement: 4 ranks on 2 hosts: h2 ranks 0-1, h3 ranks
# 2-3"), says so when a job given several hosts has all its ranks on one, and fails when the
# launcher started separate 1-rank programs instead of one job (srun with the wrong --mpi).
check_placement() {
    local out worlds rank host hosts=() h line
    if ! out="$(timeout -k 5 "${PLACEMENT_TIMEOUT:-120}" "${LAUNCH[@]}" "$PYTHON" -c "$_PLACEMENT_PY" </dev/null)"; then
        echo "error: ${LAUNCH[*]} $PYTHON cannot start an MPI program of $RANKS ranks (see above;" \
             "exit within ${PLACEMENT_TIMEOUT:-120} s): is mpi4py installed for PYTHON=$PYTHON?" >&2
        exit 1
    fi
    worlds="$(awk '$1 == "world" {print $2}' <<< "$out" | paste -sd' ' -)"
    if [[ "$worlds" != "$RANKS" ]]; then
        echo "error: ${LAUNCH[*]} did not start one MPI job of $RANKS ranks: the ranks saw" \
             "world sizes [$worlds]. With srun, pass an --mpi plugin that the MPI library speaks" \
             "(SRUN_MPI=pmix for Open MPI 5; srun --mpi=list shows the site's), or use" \
             "LAUNCHER=mpirun." >&2
        exit 1
    fi
    RANK_HOSTS=()
    while read -r line rank host; do
        [[ "$line" == rank ]] && RANK_HOSTS[rank]="$host"
    done <<< "$out"
    # hosts in order of their first rank
    for host in "${RANK_HOSTS[@]}"; do
        for h in ${hosts[@]+"${hosts[@]}"}; do [[ "$h" == "$host" ]] && continue 2; done
        hosts+=("$host")
    done
    local parts=()
    for h in "${hosts[@]}"; do
        local mine=()
        for rank in "${!RANK_HOSTS[@]}"; do [[ "${RANK_HOSTS[rank]}" == "$h" ]] && mine+=("$rank"); done
        parts+=("$h ranks $(_rank_ranges "${mine[*]}")")
    done
    PLACED_HOSTS="${#hosts[@]}"
    echo "placement: $RANKS ranks on ${#hosts[@]} host(s): $(IFS=,; echo "${parts[*]}" | sed 's/,\([^0-9]\)/, \1/g')" >&2
    if (( ${HOSTS_GIVEN:-1} > 1 && ${#hosts[@]} == 1 )); then
        echo "warning: the job was given $HOSTS_GIVEN hosts but all $RANKS ranks run on ${hosts[0]}" \
             "(see the slots of the hostfile, the mapping, or the tasks per node)" >&2
    fi
}

# bounded "${LAUNCH[@]}" PROGRAM ARGS...: run the launch under TIMEOUT seconds. The program is
# jobs/rank.py (it writes "waferllm-rank-end R HOST" when it reaches its end), and each rank runs
# through a shell that writes "waferllm-rank-exit R HOST STATUS" once its process has ended;
# both are taken out of what the user sees. When the time is up, the ranks that did not finish
# are named with their hosts. A launcher still running EXIT_GRACE seconds after every rank's
# process ended is stopped, and the job's status is the ranks' own.
bounded() {
    local n_launch="${#LAUNCH[@]}" marks pid rc=0 hung=0 done_since="" traps
    local cmd=("${@:1:n_launch}" bash -c \
        '"$@"; rc=$?; echo "waferllm-rank-exit ${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${SLURM_PROCID:-?}}} ${HOSTNAME:-?} $rc" >&2; exit $rc' \
        rank "${@:n_launch+1}")
    marks="$(mktemp "${TMPDIR:-/tmp}/waferllm-ranks.XXXXXX")"
    timeout -k 10 "$TIMEOUT" "${cmd[@]}" </dev/null 2> >(
        while IFS= read -r line; do
            case "$line" in
                waferllm-rank-end\ *|waferllm-rank-exit\ *) echo "${line#waferllm-rank-}" >> "$marks" ;;
                "") ;;
                *) printf '%s\n' "$line" >&2 ;;
            esac
        done) &
    pid=$!
    traps="$(trap -p TERM INT)"
    trap 'kill -TERM "$pid" 2>/dev/null; exit 143' TERM INT
    while kill -0 "$pid" 2>/dev/null; do
        if [[ "$(grep -c '^exit ' "$marks")" -ge "$RANKS" ]]; then
            done_since="${done_since:-$SECONDS}"
            if (( SECONDS - done_since >= EXIT_GRACE )); then
                hung=1
                kill -TERM "$pid" 2>/dev/null || true
                break
            fi
        fi
        sleep 0.2
    done
    wait "$pid" || rc=$?
    trap - TERM INT
    eval "$traps"
    sleep 0.1    # the filter's last lines
    if [[ "$hung" == 1 ]]; then
        rc="$(awk 'BEGIN {m = 0} $1 == "exit" && $4 > m {m = $4} END {print m}' "$marks")"
        echo "warning: every rank ended, but ${cmd[0]##*/} did not exit within ${EXIT_GRACE} s" \
             "(a known Open MPI 5 hang after jobs across hosts): stopped it; the ranks' status is" \
             "$rc" >&2
    elif [[ "$rc" == 124 || "$rc" == 137 ]]; then
        local r left=() ended done_list
        done_list="$(awk '$1 == "end" {print $2}' "$marks" | sort -n | paste -sd' ' -)"
        ended=" $done_list "
        for ((r = 0; r < RANKS; r++)); do
            [[ "$ended" == *" $r "* ]] || left+=("rank $r${RANK_HOSTS[r]:+ on ${RANK_HOSTS[r]}}")
        done
        if [[ ${#left[@]} == 0 ]]; then
            echo "error: timed out after ${TIMEOUT} s (TIMEOUT=): every rank reached its end," \
                 "but ${cmd[0]##*/} did not exit" >&2
        else
            echo "error: timed out after ${TIMEOUT} s (TIMEOUT=): not finished: $(IFS=,; echo "${left[*]}" |
                 sed 's/,/, /g')${done_list:+ (ranks $(_rank_ranges "$done_list") reached their end)}" >&2
        fi
    fi
    rm -f "$marks"
    return "$rc"
}
