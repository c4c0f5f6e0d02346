#!/usr/bin/env bash
# Downloads the wheels that benchmarks/gpu_check.sh needs on the GPU box and its image lacks, for
# Python 3.12 on manylinux x86_64, into .whl/ (git-ignored; it travels with the checkout). Run it
# here, where PyPI is reachable; the box has no network. gpu_check.sh installs them with
# `pip install --no-index --no-deps --target` when .whl/ holds any.
#
#   bash benchmarks/gpu_wheels.sh          # PY=python3.12 to use another pip
#
# The image has torch 2.11, lightning 2.6.6, torchmetrics, tensorboard, transformers,
# safetensors, tokenizers, accelerate, pyarrow, numpy and matplotlib (with their own dependencies:
# idna, certifi, python-dateutil, PyYAML...), so only what the check imports beyond those is
# listed, without dependencies (found by importing in a venv that holds only that list):
# - litdata (the data module's streaming datasets) and what it imports on the way: boto3 and
#   requests at module level (its cloud clients), and theirs; tifffile and obstore are imported
#   only for images and object stores, and torchvision would not load beside that torch;
# - omegaconf (the CLI's parser mode) and jsonargparse with its `signatures` extra, which
#   Lightning's CLI checks for by distribution metadata.
# licensedcode-data (the legal corpus, 20 MB) is not needed: the check's `bam fit` reads the
# built-in code and math domains, both made offline from the interpreter itself.
# Versions are the ones the dev environment tests with; change them together with pyproject.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
WHEELS=(
    litdata==0.2.76
    boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0 urllib3==2.8.0
    requests==2.34.2 charset-normalizer==3.5.3
    omegaconf==2.4.0
    jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
)

TMP=.whl.partial
rm -rf "$TMP"
mkdir "$TMP"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$TMP" \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "${WHEELS[@]}"
rm -rf .whl
mv "$TMP" .whl  # all or nothing: a failed download leaves the previous bundle as it was
ls -1 .whl
echo "gpu_wheels: $(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
