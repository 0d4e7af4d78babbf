#!/usr/bin/env bash
# Simulated hosts on this machine, for running MPI jobs "across nodes" in tests.
#
# Each host h1..hN has its own network namespace (a private TCP network 10.77.0.0/24 on a bridge,
# no default route: traffic only goes between the simulated hosts), its own host name, /etc/hosts,
# IPC and /dev/shm and, with --private-tmp, its own /tmp (the other hosts cannot see its files).
# Nothing but iproute2 and util-linux (ip, unshare, nsenter) is needed; Open MPI starts its
# daemons on the other hosts through `agent`, which stands in for ssh.
#
# Usage (as root):
#   tools/multihost.sh install             apt-get install iproute2 and util-linux if ip, unshare or
#                                          nsenter is missing (root)
#   tools/multihost.sh check               exit 0 if the hosts can be made here, else say why (exit 3)
#   tools/multihost.sh up [N] [--private-tmp]   make hosts h1..hN [3]
#   tools/multihost.sh down                remove everything `up` made (processes by recorded pid,
#                                          namespaces by name, the state directory)
#   tools/multihost.sh exec HOST CMD...    run CMD on HOST, in the current directory
#   tools/multihost.sh agent [-opts] HOST COMMAND   what Open MPI runs instead of ssh
#   tools/multihost.sh env                 the environment of a job across the hosts (export lines)
#
# State lives in MULTIHOST_DIR [/var/tmp/waferllm-multihost] (not under /tmp, which a host may
# hide); namespaces are named MULTIHOST_PREFIX-hI [wlmh]. A repository under /tmp stays visible
# on hosts with a private /tmp (it is mounted back at the same path).
set -euo pipefail

DIR="${MULTIHOST_DIR:-/var/tmp/waferllm-multihost}"
PREFIX="${MULTIHOST_PREFIX:-wlmh}"
SUBNET=10.77.0
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$REPO/tools/multihost.sh"

die() { echo "multihost: error: $*" >&2; exit 1; }
say() { echo "multihost: $*" >&2; }

cmd_check() {
    local missing=()
    [[ "$(id -u)" == 0 ]] || { echo "not root: network namespaces and mounts need root" >&2; exit 3; }
    local tool
    for tool in ip unshare nsenter mount; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "missing ${missing[*]} (Debian: iproute2, util-linux, mount)" >&2; exit 3
    fi
    if ! ip netns add "$PREFIX-probe" 2>/dev/null; then
        echo "cannot create a network namespace here (ip netns add failed)" >&2; exit 3
    fi
    ip netns del "$PREFIX-probe" 2>/dev/null || true
    if ! unshare --mount --uts --ipc -- true 2>/dev/null; then
        ip netns del "$PREFIX-probe" 2>/dev/null || true
        echo "cannot create mount/UTS/IPC namespaces here (unshare failed)" >&2; exit 3
    fi
}

cmd_install() {
    local tool
    for tool in ip unshare nsenter; do
        command -v "$tool" >/dev/null && continue
        if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then return 0; fi   # check says why
        say "installing iproute2 and util-linux ($tool is missing)"
        export DEBIAN_FRONTEND=noninteractive
        timeout 300 apt-get update -qq </dev/null
        timeout 300 apt-get install -y -qq --no-install-recommends iproute2 util-linux </dev/null
        return
    done
}

hosts() { cat "$DIR/hosts" 2>/dev/null; }

# The pid of HOST's holder process (a `sleep` inside its namespaces), if it is still alive.
holder() {
    local pid
    pid="$(cat "$DIR/$1.pid" 2>/dev/null)" || return 1
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 1
    echo "$pid"
}

# Run inside the new mount namespace of a host before anything else: its name, /etc/hosts, a
# /dev/shm of its own, the cgroup mounts that `ip netns exec` hid (slurmd needs them) and,
# with a private /tmp, its own /tmp.
host_init() {
    local name="$1" private="$2"
    mount --make-rprivate /
    hostname "$name"
    mount --bind "$DIR/etc-hosts" /etc/hosts
    mount -t tmpfs -o size=2g tmpfs /dev/shm
    # `ip netns exec` mounted a fresh /sys without the cgroup hierarchies
    if [[ -s "$DIR/cgroup-mounts" ]] && ! mountpoint -q /sys/fs/cgroup; then
        mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
        local dev mnt type opts
        while read -r dev mnt type opts; do
            mkdir -p "$mnt"
            mount -t "$type" -o "$opts" "$dev" "$mnt" || true
        done < "$DIR/cgroup-mounts"
    fi
    if [[ "$private" == 1 ]]; then
        local old="$DIR/$name.root-tmp"
        mkdir -p "$old" "$DIR/$name.tmp"
        chmod 1777 "$DIR/$name.tmp"
        mount --rbind /tmp "$old"
        mount --rbind "$DIR/$name.tmp" /tmp
        if [[ "$REPO" == /tmp/* ]]; then    # the repository stays where it is
            mkdir -p "$REPO"
            mount --rbind "$old/${REPO#/tmp/}" "$REPO"
        fi
    fi
}

cmd_up() {
    local n=3 private=0 i
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --private-tmp) private=1 ;;
            [0-9]*) n="$1" ;;
            *) die "up: unknown argument '$1'" ;;
        esac
        shift
    done
    cmd_check
    [[ -z "$(hosts)" ]] || die "hosts are already up from $DIR (run: $0 down)"
    rm -rf "$DIR"
    mkdir -p "$DIR"
    : > "$DIR/hosts"
    echo "$private" > "$DIR/private-tmp"
    { echo "127.0.0.1 localhost"; for ((i = 1; i <= n; i++)); do echo "$SUBNET.$i h$i"; done; } \
        > "$DIR/etc-hosts"
    awk '$2 ~ "^/sys/fs/cgroup/" {print $1, $2, $3, $4}' /proc/mounts > "$DIR/cgroup-mounts"

    local hub="$PREFIX-hub"
    ip netns add "$hub"
    echo "$hub" > "$DIR/netns"
    ip -n "$hub" link set lo up
    ip -n "$hub" link add br0 type bridge
    ip -n "$hub" link set br0 up
    for ((i = 1; i <= n; i++)); do
        local ns="$PREFIX-h$i"
        ip netns add "$ns"
        echo "$ns" >> "$DIR/netns"
        ip -n "$hub" link add "v$i" type veth peer name eth0 netns "$ns"
        ip -n "$hub" link set "v$i" master br0 up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        # the holder: a process that keeps the host's namespaces; everything else enters them
        ip netns exec "$ns" unshare --mount --uts --ipc --propagation private -- \
            bash -c "$(declare -f host_init); DIR='$DIR' REPO='$REPO'; host_init h$i $private \
                     && exec sleep infinity" </dev/null >"$DIR/h$i.log" 2>&1 &
        echo $! > "$DIR/h$i.pid"
        echo "h$i" >> "$DIR/hosts"
    done
    # wait until every host took its name (host_init done), and the network answers
    local deadline=$((SECONDS + 20)) h
    for h in $(hosts); do
        until [[ "$(run_on "$h" hostname 2>/dev/null)" == "$h" ]]; do
            (( SECONDS < deadline )) || die "host $h did not come up (see $DIR/$h.log)"
            holder "$h" >/dev/null || die "host $h ended at start: $(cat "$DIR/$h.log")"
            sleep 0.1
        done
    done
    # every host reaches the others (a closed port answers "refused" once the network is up)
    for ((i = 2; i <= n; i++)); do
        run_on h1 timeout 10 bash -c "until (exec 3<>/dev/tcp/$SUBNET.$i/9) 2>&1 | grep -q refused; do
            sleep 0.2; done" </dev/null || die "h1 cannot reach h$i at $SUBNET.$i"
    done
    say "up: $(hosts | paste -sd' ' -) on $SUBNET.0/24$([[ $private == 1 ]] && echo ', each with its own /tmp')"
}

# run_on HOST CMD...: CMD inside HOST's namespaces, in the current directory.
run_on() {
    local h="$1" pid
    shift
    pid="$(holder "$h")" || die "no host '$h' (hosts: $(hosts | paste -sd' ' -))"
    MULTIHOST_CWD="$PWD" nsenter -t "$pid" -m -u -i -n -- \
        bash -c 'cd "$MULTIHOST_CWD" 2>/dev/null || cd /; unset MULTIHOST_CWD; exec "$@"' bash "$@"
}

# Open MPI's ssh stand-in: [options] HOST COMMAND-STRING.
cmd_agent() {
    while [[ $# -gt 0 && "$1" == -* ]]; do
        case "$1" in -[lpioF]) shift ;; esac    # options that take a value
        shift
    done
    [[ $# -ge 2 ]] || die "agent: expected HOST COMMAND"
    local h="$1"
    shift
    h="${h%%.*}"
    if [[ "$h" == "$SUBNET".* ]]; then h="h${h##*.}"; fi
    run_on "$h" sh -c "$*"
}

cmd_env() {
    local agent="$DIR/agent"
    cat <<EOF
export PRTE_MCA_plm_ssh_agent=$agent
export OMPI_MCA_pml=ob1 OMPI_MCA_btl=tcp,self OMPI_MCA_btl_tcp_if_include=$SUBNET.0/24
export OMPI_MCA_oob_tcp_if_include=$SUBNET.0/24 PRTE_MCA_prte_if_include=$SUBNET.0/24
export OMPI_MCA_mpi_yield_when_idle=1
EOF
}

cmd_down() {
    local h pid ns deadline
    [[ -d "$DIR" ]] || return 0
    for h in $(hosts); do
        pid="$(holder "$h")" || continue
        # every process still inside the host's namespaces (daemons, ranks), then the holder
        local inside
        inside="$(for p in /proc/[0-9]*; do
            if [[ "$(readlink "$p/ns/uts" 2>/dev/null)" == "$(readlink "/proc/$pid/ns/uts")" ]]; then
                echo "${p#/proc/}"
            fi
        done)"
        # shellcheck disable=SC2086
        [[ -z "$inside" ]] || kill -TERM $inside 2>/dev/null || true
        deadline=$((SECONDS + 5))
        while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.1; done
        # shellcheck disable=SC2086
        [[ -z "$inside" ]] || kill -KILL $inside 2>/dev/null || true
    done
    for ns in $(cat "$DIR/netns" 2>/dev/null); do
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$DIR"
}

case "${1:-}" in
    check) cmd_check ;;
    install) cmd_install ;;
    up) shift; cmd_up "$@"
        printf '#!/bin/sh\nexec %q agent "$@"\n' "$SELF" > "$DIR/agent"
        chmod +x "$DIR/agent" ;;
    down) cmd_down ;;
    exec) shift; [[ $# -ge 2 ]] || die "exec HOST CMD..."; run_on "$@" ;;
    agent) shift; cmd_agent "$@" ;;
    env) cmd_env ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
