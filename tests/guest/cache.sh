# Sourced by tests/guest/build.sh and tests/guest/cloud/build.sh: logging, and the cached-output check and lock
# both guest builders share. The sourcing script sets ME, START, OUT, STAMP and FILES first.

die() { echo "$ME: error: $*" >&2; exit 1; }
step() { printf '%s: [%6.1fs] %s\n' "$ME" "$(awk -v a="$START" -v b="$EPOCHREALTIME" 'BEGIN {print b - a}')" "$*"; }

is_cached() {
    [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$STAMP" ] || return 1
    for f in "${FILES[@]}" SHA256SUMS; do [ -f "$OUT/$f" ] || return 1; done
    # no re-hash here (fast path); verify with: cd OUTDIR && sha256sum -c SHA256SUMS
    return 0
}

# Exit 0 when OUT already holds this build; otherwise take OUT's lock (fd 9: concurrent builds into one OUT
# wait for each other) and look again, since the one we waited for may have built it.
exit_if_cached_else_lock() {
    if is_cached; then echo "$ME: cached: $OUT is up to date ($1, stamp ${STAMP:0:12})"; exit 0; fi
    exec 9>"$OUT/.lock"
    if ! flock -n 9; then
        step "another build holds $OUT/.lock; waiting"
        flock 9
    fi
    if is_cached; then echo "$ME: cached: $OUT is up to date ($1, stamp ${STAMP:0:12})"; exit 0; fi
}
