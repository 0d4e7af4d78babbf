# Shared by the shell test targets (tests/slurm/run.sh, tests/multihost/run.sh): one line per
# check, counted in the caller's $passed and $failed; a failed check shows the last lines of
# its logs.

ok() { passed=$((passed + 1)); echo "ok     $1"; }

# not_ok MESSAGE [LOG ...]
not_ok() {
    failed=$((failed + 1))
    echo "FAILED $1"
    shift
    local f
    for f in "$@"; do
        [[ -s "$f" ]] && { echo "  --- $f (last lines)"; tail -n 15 "$f" | sed 's/^/  /'; }
    done
    return 0
}
