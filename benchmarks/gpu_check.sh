#!/usr/bin/env bash
# The whole GPU check as one script, sized for a short lease of one GPU (under ~8 minutes on an H100):
# the `gpu` test tier, a step profile on CUDA, and GPT-2 small on WikiText-2 against HF Trainer.
#
# Run from the repository root with a Python that has a CUDA build of torch and kiln's dependencies
# (PYTHON, default .venv/bin/python, else python3; `pip install -e . --no-deps` makes kiln importable
# where torch and transformers are already installed). WikiText-2 is read from DATA (default
# ../shared/data/wikitext-2; a machine without ../shared needs a copy under an ignored path of the
# checkout, e.g. shared/data/wikitext-2, which gpt2_wikitext2.py also finds with --data).
# Results land in ${OUT:-gpu-results}/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
py="${PYTHON:-}"
[ -n "$py" ] || { [ -x .venv/bin/python ] && py=.venv/bin/python || py=python3; }
data="${DATA:-../shared/data/wikitext-2}"
[ -d "$data" ] || data=shared/data/wikitext-2
$py -c "import kiln" 2>/dev/null || $py -m pip install -q -e . --no-deps
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 240 $py -m pytest -m gpu -q -x -p no:cacheprovider 2>&1 | tail -20 | tee "$out/gpu-tests.txt"
timeout 90 $py benchmarks/profile_step.py --profile bert-base --task mlm --batch-size 32 --data "$data" \
    --out "$out/profile.json" 2>&1 | tail -12 | tee "$out/profile.txt"
timeout 300 $py benchmarks/gpt2_wikitext2.py --data "$data" --out "$out/gpt2.json" 2>&1 | tail -12 \
    | tee "$out/gpt2.txt"
