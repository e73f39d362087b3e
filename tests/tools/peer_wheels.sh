#!/usr/bin/env bash
# Run HERE (where PyPI is reachable), before a GPU call: downloads into .whl/ (git-ignored) the
# wheels the GPU image lacks for the peers that fusedrl.bench compares against: trl==0.29.1 (its
# last release with a PPO trainer) and, in .whl/trl1/, TRL 1.16 with Liger (the GRPO and fused-head
# peers of `fusedrl bench`, first on bench_all's path), peft (TRL's LoRA side of bench_ppo.py --lora, and the LoRA tests)
# and `datasets` with the pieces of it the image does not have (the data tests import it; the
# image has none), and pytest-xdist with execnet (the suite's chunks spread over the cores).
# The image already has accelerate, pandas, pyarrow, xxhash, fsspec and transformers. Then name
# `.whl` in every device call's `carry` (`bash bench/gpu.sh prepare` runs this and records the
# commit in .whl/COMMIT); bench/gpu.sh installs them into a private folder by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl trl==0.29.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2 \
  pytest-xdist==3.8.0 execnet==2.1.2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl/trl1 trl==1.16.0 liger-kernel==0.8.5
ls -l .whl
