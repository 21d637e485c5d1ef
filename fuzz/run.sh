#!/usr/bin/env bash
# The bounded fuzz runs for CI: for each target, build its seed corpus in a
# temporary directory, run it for a bounded time, print a one-line summary,
# and exit non-zero if one found a crash.
#
#  - fuzz/request_path.py (the HTTP/1.1 request path), seeded from
#    tests/corpus_cases.py and fuzz/regressions/, for ${FUZZ_SECONDS:-60} s
#    (0 skips it); its summary line starts "fuzz: ".
#  - fuzz/http2_frames.py (the HTTP/2 server, fed frames after the client
#    preface), seeded from conversations built with the h2 package and
#    fuzz/regressions/http2/, for ${FUZZ_HTTP2_SECONDS:-30} s (0 skips it);
#    its summary line starts "fuzz http2: ".
#
# Nothing is written into the repository: the corpus the fuzzer grows and
# any crash reproducer stay in the temporary directory, whose path is
# printed (and which is removed after a clean run unless FUZZ_KEEP=1).  The
# targets open no sockets: the proxy runs over in-memory transports.
#
# Environment: FUZZ_SECONDS (60), FUZZ_HTTP2_SECONDS (30), FUZZ_TIMEOUT per
# input (10 s), FUZZ_RSS_MB (2048), FUZZ_MAX_LEN (50000), FUZZ_HTTP2_MAX_LEN
# (20000), VENV (.venv), FUZZ_KEEP.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-.venv}"
if [[ ! -x "$venv/bin/python" && -x "$root/$venv/bin/python" ]]; then
    venv="$root/$venv"
fi
# Absolute, since the fuzzer runs from the temporary directory.
python="$(cd "$venv/bin" && pwd)/python"

# fuzzTarget LABEL TARGET SECONDS MAX_LEN [SEEDS_ARGUMENT...]
fuzzTarget() {
    local label="$1" target="$2" seconds="$3" maxLen="$4"
    shift 4
    local work corpus artifacts log seeds started status elapsed
    work="$(mktemp -d "${TMPDIR:-/tmp}/monedge-fuzz.XXXXXX")"
    corpus="$work/corpus"
    artifacts="$work/artifacts"
    log="$work/fuzz.log"
    mkdir -p "$corpus" "$artifacts"

    seeds="$("$python" "$root/fuzz/seeds.py" "$@" "$corpus" "$work/fuzz.dict")"

    started=$SECONDS
    status=0
    # Run from the temporary directory, so that nothing libFuzzer writes by
    # default (crash-*, fuzz-*.log) can land in the caller's directory.
    (
        cd "$work"
        "$python" "$root/fuzz/$target" \
            -max_total_time="$seconds" \
            -timeout="${FUZZ_TIMEOUT:-10}" \
            -rss_limit_mb="${FUZZ_RSS_MB:-2048}" \
            -max_len="$maxLen" \
            -dict="$work/fuzz.dict" \
            -artifact_prefix="$artifacts/" \
            -print_final_stats=1 \
            "$corpus"
    ) >"$log" 2>&1 || status=$?
    elapsed=$((SECONDS - started))

    local executions rate coverage features crashes kept
    executions="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    if [[ -z "$executions" ]]; then
        executions="$(grep -o '^#[0-9]*' "$log" | tail -n 1 | tr -d '#' || true)"
    fi
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
    coverage="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2 || true)"
    features="$(grep -o 'ft: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2 || true)"
    crashes="$(find "$artifacts" -type f | wc -l | tr -d ' ')"

    if [[ $status -ne 0 || $crashes -ne 0 ]]; then
        grep -v '^#' "$log" | tail -n 60 >&2 || true
        echo "$label: FAILED (exit $status) executions=${executions:-0}" \
            "coverage=${coverage:-0} features=${features:-0} exec/s=${rate:-0}" \
            "seconds=$elapsed seeds=$seeds crashes=$crashes" \
            "artifacts=$artifacts log=$log"
        return $((status == 0 ? 1 : status))
    fi

    kept="$work (kept)"
    if [[ -z "${FUZZ_KEEP:-}" ]]; then
        rm -rf "$work"
        kept="$work (removed: no crash)"
    fi
    echo "$label: ok executions=${executions:-0} coverage=${coverage:-0}" \
        "features=${features:-0} exec/s=${rate:-0} seconds=$elapsed seeds=$seeds" \
        "crashes=0 artifacts=$kept"
}

result=0
seconds="${FUZZ_SECONDS:-60}"
if [[ "$seconds" != 0 ]]; then
    fuzzTarget "fuzz" request_path.py "$seconds" "${FUZZ_MAX_LEN:-50000}" ||
        result=$?
fi
http2Seconds="${FUZZ_HTTP2_SECONDS:-30}"
if [[ "$http2Seconds" != 0 ]]; then
    fuzzTarget "fuzz http2" http2_frames.py "$http2Seconds" \
        "${FUZZ_HTTP2_MAX_LEN:-20000}" http2 || result=$?
fi
exit "$result"
