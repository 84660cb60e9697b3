#!/usr/bin/env bash
# Every converged measurement the README's verdicts rest on, in the order they are needed; each step is
# resumable and skips what is done, so after an interruption the same command goes on where it stopped.
#
#   mkdir -p runs && nohup bash scripts/evidence.sh > runs/evidence.log 2>&1 &
#
# 1. SmolLM2: the verdict strategies with three seeds, the 20-step regime, ILA's top 30 % at equal
#    wall-clock time, three more seeds of all, the top 30 % and random-30 (a verdict waits for them), the
#    benchmarks (scripts/converged.sh smollm2 draws);
# 2. SmolLM2: the rest of the grid with one seed (scripts/converged.sh smollm2);
# 3. the study in the same regime, both models (scripts/study-converged.sh);
# 4. Gemma-3-270M (base): the verdict strategies, the 20-step regime, equal time and the benchmarks, in fp32
#    (scripts/converged.sh gemma3-270m verdicts).
#
# What a verdict waits for comes first. The SmolLM2 steps train under bf16 autocast, as its kept runs did
# (docs/results/converged/smollm2 holds every run of steps 1 and 2); on a CPU without bf16 instructions they
# stop at once (exit 3, saying so; not a failure) and the fp32 steps go on. `bash scripts/converged.sh
# smollm2 grid fp32` runs SmolLM2's comparison in fp32 instead, with an `all` of its own.
#
# A step that fails does not stop the ones after it (they do not depend on it); the script exits non-zero at
# the end, naming the steps that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
step() { "$@" || { echo "evidence: '$*' failed" >&2; failed+=("$*"); }; }
smollm2() {  # a SmolLM2 step in its kept bf16; 3: no bf16 instructions here, not a failure
    bash scripts/converged.sh smollm2 "$@"
    local rc=$?
    [ $rc -eq 3 ] && return 0
    return $rc
}
step smollm2 draws
step smollm2
step bash scripts/study-converged.sh
step bash scripts/converged.sh gemma3-270m verdicts
[ ${#failed[@]} -eq 0 ] || { printf 'evidence: failed: %s\n' "${failed[@]}" >&2; exit 1; }
