#!/usr/bin/env bash
# Fetches into ./.whl-lerobot (ignored; added to .git/info/exclude) the wheels that let the GPU
# machine (Python 3.12 x86_64, torch 2.11, transformers 5, no network) run LeRobot 0.4.4's own
# SmolVLA beside the runtime: the peer column of bench/bench_smolvla.py (bench/lerobot_peer.py
# loads it). About 20 MB; they travel with the checkout (the `carry` of a device call).
#
# What is in it, and why:
#   lerobot 0.4.4                 installed without its dependencies (its metadata pins torch<2.11
#                                 and pulls its dataset, video and robot extras); torch stays the
#                                 machine's
#   transformers 4.57.6, tokenizers 0.22.2, huggingface-hub 0.35.3
#                                 LeRobot 0.4.4 pins transformers<5; under transformers 5 SmolVLM's
#                                 vision position ids differ (bench/lerobot_peer.py says how), so
#                                 the peer runs on the transformers it was written for, which needs
#                                 this tokenizers and a huggingface_hub below 1.0
#   the rest                      what lerobot.policies.smolvla, lerobot.processor and
#                                 lerobot.policies (the package's __init__ imports every policy's
#                                 config, GR00T's model and so diffusers with it) import at their
#                                 top level and the machine's image lacks: draccus (+ mergedeep),
#                                 datasets (+ multiprocess, dill), pyserial, deepdiff
#                                 (+ orderly-set), num2words (transformers' SmolVLMProcessor),
#                                 diffusers
# Not here: PyAV (a 40 MB wheel; bench/lerobot_peer.py puts a documented stand-in in its place) and
# what the image already has (pandas, pyarrow, torchvision, accelerate, imageio, einops, xxhash,
# typing-inspect, mypy-extensions, pillow, requests, ...: /work/.library/device/KINDS.md's list).
#
# Usage, from the project root:  bash tools/gpu-peer-wheels.sh
# On the GPU machine, into a folder of their own that goes first on PYTHONPATH for the benchmark
# only (transformers 4.57.6 there shadows the image's 5.x):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#     --target /tmp/site-lerobot .whl-lerobot/*.whl
#   PYTHONPATH=/tmp/site-lerobot:$PWD python3 bench/bench_smolvla.py --device cuda
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest=.whl-lerobot
grep -qx "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >> .git/info/exclude
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" \
  lerobot==0.4.4 transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.35.3 \
  draccus==0.10.0 mergedeep==1.3.4 datasets==4.2.0 multiprocess==0.70.16 dill==0.4.0 \
  pyserial==3.5 deepdiff==8.6.1 orderly-set==5.5.0 num2words==0.5.14 diffusers==0.35.2
ls -la "$dest"
du -sh "$dest"
