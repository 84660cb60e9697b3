#!/usr/bin/env bash
# Every converged measurement the README's verdicts rest on, in the order they are needed; each step is
# resumable and skips what is done, so after an interruption the same command goes on where it stopped.
#
#   mkdir -p runs && nohup bash scripts/evidence.sh > runs/evidence.log 2>&1 &
#
# 1. SmolLM2: the verdict strategies with three seeds, the 20-step regime, ILA's top 30 % at equal
#    wall-clock time, three more seeds of all, the top 30 % and random-30 (a verdict waits for them), the
#    benchmarks (scripts/converged.sh smollm2 draws);
# 2. on a CPU with bf16 instructions, SmolLM2: the rest of the grid with one seed (scripts/converged.sh
#    smollm2), paired with the kept bf16 runs;
# 3. the study in the same regime, both models (scripts/study-converged.sh);
# 4. Gemma-3-270M (base): the same, in fp32 (scripts/converged.sh gemma3-270m verdicts);
# 5. on a CPU without bf16 instructions, the SmolLM2 grid in fp32 instead, paired only with itself: all, the
#    top 30 % and random-30 with six seeds, the benchmarks of random-30 and all-rank-R, the rest of the grid
#    (scripts/converged.sh smollm2 grid fp32).
#
# What a verdict waits for comes first: the draws that SmolLM2's top 30 % against random-30 needs. The rest
# of SmolLM2's grid comes next where the machine can run it in bf16, since only such a machine can pair it
# with the kept runs, while the study and Gemma's fp32 runs can run on any machine.
#
# The SmolLM2 steps train under bf16 autocast, as its kept runs did; on a CPU without bf16 instructions they
# stop at once (exit 3, saying so; not a failure) and the steps in fp32 go on, step 5 in fp32 itself.
#
# A step that fails does not stop the ones after it (they do not depend on it); the script exits non-zero at
# the end, naming the steps that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
failed=()
step() { "$@" || { echo "evidence: '$*' failed" >&2; failed+=("$*"); }; }
fp32=0
smollm2() {  # a SmolLM2 step in its kept bf16
    bash scripts/converged.sh smollm2 "$@"
    local rc=$?
    [ $rc -eq 3 ] && fp32=1 && return 0  # 3: no bf16 instructions here, so step 5 runs SmolLM2 in fp32
    return $rc
}
step smollm2 draws
step smollm2
step bash scripts/study-converged.sh
step bash scripts/converged.sh gemma3-270m verdicts
[ $fp32 -eq 0 ] || step bash scripts/converged.sh smollm2 grid fp32
[ ${#failed[@]} -eq 0 ] || { printf 'evidence: failed: %s\n' "${failed[@]}" >&2; exit 1; }
