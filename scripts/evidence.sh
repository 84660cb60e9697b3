#!/usr/bin/env bash
# Every converged measurement the README's verdicts rest on, in the order they are needed; each step is
# resumable and skips what is done, so after an interruption the same command goes on where it stopped.
#
#   nohup bash scripts/evidence.sh > runs/evidence.log 2>&1 &
#
# 1. SmolLM2: the verdict strategies with three seeds, ILA's top 30 % at equal wall-clock time, the 20-step
#    regime, the benchmarks, and three more seeds of all, the top 30 % and random-30 (scripts/converged.sh
#    smollm2 draws);
# 2. the study in the same regime, both models (scripts/study-converged.sh);
# 3. Gemma-3-270M (base): the verdict strategies with three seeds (scripts/converged.sh gemma3-270m verdicts);
# 4. SmolLM2: the rest of the grid with one seed (scripts/converged.sh smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
bash scripts/converged.sh smollm2 draws
bash scripts/study-converged.sh
bash scripts/converged.sh gemma3-270m verdicts
bash scripts/converged.sh smollm2
