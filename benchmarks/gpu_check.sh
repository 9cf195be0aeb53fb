#!/usr/bin/env bash
# The whole GPU check as one script, sized for a short lease of one GPU (under ~8 minutes on an H100):
# the `gpu` test tier, a step profile on CUDA, and GPT-2 small on WikiText-2 against HF Trainer.
# Run from the repository root after `make .venv/.installed` with a CUDA build of torch in .venv.
# Results land in ${OUT:-gpu-results}/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
py=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 240 $py -m pytest -m gpu -q -x 2>&1 | tail -20 | tee "$out/gpu-tests.txt"
timeout 90 $py benchmarks/profile_step.py --profile bert-base --task mlm --batch-size 32 \
    --out "$out/profile.json" 2>&1 | tail -12 | tee "$out/profile.txt"
timeout 300 $py benchmarks/gpt2_wikitext2.py --out "$out/gpt2.json" 2>&1 | tail -12 | tee "$out/gpt2.txt"
