#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, from Debian packages, for testing jobs/slurm.sbatch.
#
# Usage (as root):
#   tools/slurm_cluster.sh check     exit 0 if this machine can run the cluster (root, apt-get or
#                                    the packages); otherwise print why and exit 3
#   tools/slurm_cluster.sh install   apt-get install slurm-wlm, munge and libpmix2 if missing
#   tools/slurm_cluster.sh up        start munged, slurmctld and slurmd; wait until the node is idle
#   tools/slurm_cluster.sh down      stop the daemons that `up` started (by the pids it recorded)
#   tools/slurm_cluster.sh env       print the `export SLURM_CONF=...` line for sbatch and squeue
#
# Everything the cluster writes (configuration, munge key, controller state, spool, logs, pid
# files) lives in one directory, SLURM_TEST_DIR [/tmp/waferllm-slurm], which `up` recreates. The
# daemons use their own ports (SLURM_TEST_PORT and the next one [16817]), so a site's SLURM on the
# same machine is left alone. munge serves its usual socket, /run/munge/munge.socket.2, as at a
# site (PMIx then picks its munge security mode, which the Open MPI wheel lacks: the warning that
# jobs/slurm.sbatch silences shows up here too); a munged already serving it is used, not
# restarted. Outside that directory `up` only adds /run/munge, the symlink libpmix.so ->
# libpmix.so.2 that Slurm's mpi/pmix plugin loads (Debian ships it only in libpmix-dev) and, if
# the host name does not resolve, a line for it in /etc/hosts.
#
# The node declares more CPUs than the machine has (SLURM_TEST_CPUS [8]), so jobs with more tasks
# than cores are scheduled instead of pending for ever; jobs/slurm.sbatch then lets waiting MPI
# ranks yield the CPU.
#
# Several hosts (simulated ones, tools/multihost.sh): SLURM_TEST_HOSTS="h1=ADDR h2=ADDR ..." puts
# slurmctld on the first host and a slurmd on each of the others, each started with
# SLURM_TEST_EXEC HOST (e.g. "tools/multihost.sh exec"); the client commands (sinfo, sbatch,
# squeue, scancel) must then run on one of the hosts, as `up` and `down` do.
set -euo pipefail

DIR="${SLURM_TEST_DIR:-/tmp/waferllm-slurm}"
PORT="${SLURM_TEST_PORT:-16817}"
CPUS="${SLURM_TEST_CPUS:-8}"
UP_TIMEOUT="${SLURM_TEST_UP_TIMEOUT:-60}"     # seconds for the node to become idle
PACKAGES=(slurm-wlm munge libpmix2)
CONF="$DIR/slurm.conf"
PIDS="$DIR/pids"                              # "name pid" per line, in start order
# shellcheck disable=SC2206
HOSTS=(${SLURM_TEST_HOSTS:-})                 # NAME=ADDR: the controller's host, then the nodes
# shellcheck disable=SC2206
EXEC=(${SLURM_TEST_EXEC:-})
MUNGE_SOCKET=/run/munge/munge.socket.2

die() { echo "slurm_cluster: error: $*" >&2; exit 1; }
say() { echo "slurm_cluster: $*" >&2; }

packages_missing() {
    local p missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    echo "${missing[@]+"${missing[@]}"}"
}

cmd_check() {
    if [[ "$(id -u)" != 0 ]]; then
        echo "not root: a SLURM cluster needs root to start slurmd" >&2; exit 3
    fi
    if [[ -n "$(packages_missing)" ]] && ! command -v apt-get >/dev/null; then
        echo "no apt-get, and missing Debian packages: $(packages_missing)" >&2; exit 3
    fi
}

cmd_install() {
    cmd_check
    local missing
    missing="$(packages_missing)"
    if [[ -z "$missing" ]]; then
        say "packages present: ${PACKAGES[*]}"
        return
    fi
    say "installing $missing"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq </dev/null
    # Debian's policy-rc.d may forbid starting services ("invoke-rc.d: policy-rc.d denied
    # execution of start"): harmless, `up` starts its own daemons.
    # shellcheck disable=SC2086
    timeout 300 apt-get install -y -qq --no-install-recommends $missing </dev/null
}

# The pid of a recorded daemon if that process is still alive and still that daemon, else nothing.
live_pid() {
    local pid
    pid="$(awk -v n="$1" '$1 == n {print $2}' "$PIDS" 2>/dev/null)"
    # a record "slurmd-h2" is a slurmd process
    if [[ -n "$pid" ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "${1%%-*}" ]]; then echo "$pid"; fi
}

# Wait (up to $2 seconds) for a file to appear; the daemons write their pid file once they run.
wait_file() {
    local deadline=$((SECONDS + $2))
    until [[ -s "$1" ]]; do
        (( SECONDS < deadline )) || return 1
        sleep 0.2
    done
}

record() { echo "$1 $2" >> "$PIDS"; }

# on HOST CMD...: CMD on that simulated host (here, without SLURM_TEST_HOSTS)
on() {
    local h="$1"
    shift
    if [[ ${#HOSTS[@]} -gt 0 ]]; then "${EXEC[@]}" "$h" "$@"; else "$@"; fi
}
ctl_host() { local h="${HOSTS[0]:-}"; echo "${h%%=*}"; }

libpmix_link() {
    # Slurm's mpi/pmix plugin dlopens .../pmix2/lib/libpmix.so, which only libpmix-dev ships.
    local so
    so="$(dpkg -L libpmix2 | grep '/pmix2/lib/libpmix\.so\.2$' | head -n 1)"
    [[ -n "$so" ]] || die "libpmix2 does not ship pmix2/lib/libpmix.so.2"
    [[ -e "$(dirname "$so")/libpmix.so" ]] || ln -s libpmix.so.2 "$(dirname "$so")/libpmix.so"
}

write_conf() {
    # one node (this host), or the simulated hosts of SLURM_TEST_HOSTS: the first runs
    # slurmctld, the others slurmd (one spool, pid and log file each: %n)
    local ctl ctl_addr per kind entry names=()
    if [[ ${#HOSTS[@]} -gt 0 ]]; then
        ctl="${HOSTS[0]%%=*}" ctl_addr="${HOSTS[0]#*=}" per="-%n"
        kind="a test cluster of simulated hosts"
    else
        ctl="$(hostname -s)" ctl_addr=127.0.0.1 per="" kind="a one-node test cluster"
        # slurmctld runs only on the host named by SlurmctldHost, and the daemons look the name up.
        if ! getent hosts "$ctl" >/dev/null; then
            say "adding '127.0.0.1 $ctl' to /etc/hosts (the host name did not resolve)"
            echo "127.0.0.1 $ctl" >> /etc/hosts
        fi
    fi
    cat > "$CONF" <<EOF
# Written by tools/slurm_cluster.sh: $kind; everything under $DIR.
ClusterName=waferllm-test
SlurmctldHost=$ctl($ctl_addr)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool$per
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd$per.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd$per.log
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# More CPUs than cores: without it a job with more tasks than cores pends for ever.
SlurmdParameters=config_overrides
EOF
    if [[ ${#HOSTS[@]} -gt 0 ]]; then
        for entry in "${HOSTS[@]:1}"; do
            echo "NodeName=${entry%%=*} NodeAddr=${entry#*=} CPUs=$CPUS State=UNKNOWN" >> "$CONF"
            names+=("${entry%%=*}")
        done
    else
        echo "NodeName=$ctl NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN" >> "$CONF"
        names=("$ctl")
    fi
    echo "PartitionName=test Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP" \
        >> "$CONF"
    : > "$DIR/plugstack.conf"
}

cmd_up() {
    cmd_check
    [[ -z "$(packages_missing)" ]] || die "missing packages: $(packages_missing) (run: $0 install)"
    if [[ -f "$PIDS" ]]; then
        local name
        for name in slurmd slurmctld munged; do
            [[ -z "$(live_pid "$name")" ]] || die "a cluster is already running from $DIR (run: $0 down)"
        done
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR"/{state,spool,log}
    mkdir -m 0700 "$DIR/munge"
    : > "$PIDS"
    libpmix_link
    write_conf

    if munge -S "$MUNGE_SOCKET" -n </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
        say "using the munged already serving $MUNGE_SOCKET"
    else
        mungekey --create --keyfile="$DIR/munge/munge.key"
        [[ -d "$(dirname "$MUNGE_SOCKET")" ]] || mkdir -m 0755 "$(dirname "$MUNGE_SOCKET")"
        # --force: take over a socket file left by a munged that was killed
        munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
            --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
            --seed-file="$DIR/munge/munged.seed" </dev/null
        wait_file "$DIR/munge/munged.pid" 10 || die "munged did not start (see $DIR/log/munged.log)"
        record munged "$(cat "$DIR/munge/munged.pid")"
        munge -S "$MUNGE_SOCKET" -n </dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null \
            || die "munge cannot encode and decode a credential (see $DIR/log/munged.log)"
    fi

    export SLURM_CONF="$CONF"
    local ctl nodes=() entry node
    ctl="$(ctl_host)"
    for entry in "${HOSTS[@]:1}"; do nodes+=("${entry%%=*}"); done
    on "$ctl" slurmctld -f "$CONF" </dev/null
    wait_file "$DIR/slurmctld.pid" 20 || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
    record slurmctld "$(cat "$DIR/slurmctld.pid")"
    if [[ ${#nodes[@]} == 0 ]]; then
        slurmd -f "$CONF" </dev/null
        wait_file "$DIR/slurmd.pid" 20 || die "slurmd did not start (see $DIR/log/slurmd.log)"
        record slurmd "$(cat "$DIR/slurmd.pid")"
    fi
    for node in "${nodes[@]+"${nodes[@]}"}"; do
        mkdir -p "$DIR/spool-$node"
        on "$node" slurmd -f "$CONF" </dev/null
        wait_file "$DIR/slurmd-$node.pid" 20 \
            || die "slurmd did not start on $node (see $DIR/log/slurmd-$node.log)"
        record "slurmd-$node" "$(cat "$DIR/slurmd-$node.pid")"
    done

    local deadline=$((SECONDS + UP_TIMEOUT)) state="" want=idle
    [[ ${#nodes[@]} == 0 ]] || want="$(for node in "${nodes[@]}"; do echo idle; done | paste -sd' ' -)"
    until [[ "$state" == "$want" ]]; do
        if (( SECONDS >= deadline )); then
            tail -n 5 "$DIR"/log/*.log >&2 || true
            die "nodes not idle after ${UP_TIMEOUT}s (state '${state:-none}'; logs in $DIR/log)"
        fi
        sleep 0.5
        state="$(on "$ctl" timeout 10 sinfo -h -N -o %T 2>/dev/null | paste -sd' ' - || true)"
    done
    say "up: ${nodes[*]:-$(hostname -s)} idle with $CPUS CPUs each;" \
        "$(on "$ctl" timeout 10 srun --mpi=list 2>&1 | tr -s '\n ' ' ')"
    say "use it with: export SLURM_CONF=$CONF"
}

cmd_down() {
    [[ -f "$PIDS" ]] || { say "no cluster recorded in $DIR"; return 0; }
    local name pid deadline jobs
    # Cancel the jobs still queued or running, so that no rank outlives the cluster.
    if [[ -n "$(live_pid slurmctld)" ]]; then
        export SLURM_CONF="$CONF"
        local ctl
        ctl="$(ctl_host)"
        jobs="$(on "$ctl" timeout 10 squeue -h -o %i 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            say "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            on "$ctl" timeout 10 scancel $jobs || true
            deadline=$((SECONDS + 30))
            while [[ -n "$(on "$ctl" timeout 10 squeue -h -o %i 2>/dev/null || true)" ]] &&
                  (( SECONDS < deadline )); do
                sleep 0.5
            done
        fi
    fi
    # slurmd first (it ends the job steps it runs), then the controller, then munge.
    for name in $(awk '$1 ~ /^slurmd/ {print $1}' "$PIDS") slurmctld munged; do
        pid="$(live_pid "$name")"
        [[ -n "$pid" ]] || continue
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 15))
        while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped $name (pid $pid)"
    done
    rm -f "$PIDS"
}

case "${1:-}" in
    check) cmd_check ;;
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
