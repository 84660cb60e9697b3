#!/usr/bin/env bash
# Every converged measurement the README's verdicts rest on, in the order they are needed; each step is
# resumable and skips what is done, so after an interruption the same command goes on where it stopped.
#
#   mkdir -p runs && nohup bash scripts/evidence.sh > runs/evidence.log 2>&1 &
#
# 1. SmolLM2: the verdict strategies with three seeds, the 20-step regime, ILA's top 30 % at equal
#    wall-clock time, three more seeds of all, the top 30 % and random-30 (a verdict waits for them), the
#    benchmarks (scripts/converged.sh smollm2 draws);
# 2. the study in the same regime, both models (scripts/study-converged.sh);
# 3. Gemma-3-270M (base): the same, in fp32 (scripts/converged.sh gemma3-270m verdicts);
# 4. SmolLM2: the rest of the grid with one seed (scripts/converged.sh smollm2); on a CPU without bf16
#    instructions the same in fp32, paired only with itself: all, the top 30 % and random-30 with six seeds,
#    the benchmarks of random-30 and all-rank-R, the rest of the grid (scripts/converged.sh smollm2 grid
#    fp32).
#
# What a verdict waits for comes first: the draws that SmolLM2's top 30 % against random-30 needs, then the
# study and the second model, before the strategies no verdict rests on.
#
# The SmolLM2 steps train under bf16 autocast, as its kept runs did; on a CPU without bf16 instructions they
# stop at once (exit 3, saying so) and the steps in fp32 go on, step 4 in fp32 itself.
#
# A step that fails does not stop the ones after it (they do not depend on it); the script exits non-zero at
# the end, naming the steps that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
step() { "$@" || { echo "evidence: '$*' failed" >&2; failed+=("$*"); }; }
smollm2_grid() {
    bash scripts/converged.sh smollm2
    local rc=$?
    [ $rc -eq 3 ] || return $rc  # 3: no bf16 instructions here
    bash scripts/converged.sh smollm2 grid fp32
}
step bash scripts/converged.sh smollm2 draws
step bash scripts/study-converged.sh
step bash scripts/converged.sh gemma3-270m verdicts
step smollm2_grid
[ ${#failed[@]} -eq 0 ] || { printf 'evidence: failed: %s\n' "${failed[@]}" >&2; exit 1; }
