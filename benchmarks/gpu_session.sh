#!/usr/bin/env bash
# The open GPU questions of benchmarks/README.md in one command, for a GPU machine rented by the minute
# without network access:
#
#   bash benchmarks/gpu_session.sh OUT_DIR [gpu_train.py options...]
#
# 1. installs the wheels in $WHEELS (default ./.whl), if any, into /tmp/site (packages the machine's image lacks: trl,
#    datasets, bitsandbytes, liger-kernel, ...; download them beforehand on a machine with network);
# 2. runs the 8B chat arms most wanted first, within DEADLINE_S seconds (default 520): a finished arm is
#    never lost, an arm the finished ones predict would end past the deadline is not started;
# 3. writes OUT_DIR/gpu_train-8b-chat.json and prints the table.
#
# Options after OUT_DIR override the defaults below (argparse keeps the last value), e.g. a CPU smoke run:
#   bash benchmarks/gpu_session.sh /tmp/o --shapes tiny --arms a,b --steps 2 --warmup 1 --max-length 256
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_session.sh OUT_DIR [gpu_train.py options...]}
shift
python=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# Most wanted first (benchmarks/README.md, "Against the targets"): the baseline every ratio needs; the
# candidate for 8B QLoRA >= 2x at <= 0.6x memory; bf16 MFU at 4k and its QLoRA twin (QLoRA vs bf16 at the
# same settings); the candidate with flex_attention; then bf16 MFU with PEFT's fp32 round trip of adapted
# inputs (what tuneforge skips), the candidate's bf16 twin, LoRA dropout 0, the lean default layout,
# flex_attention.
arms=a,c_gc3_lean,c1_bf16,c1_lean,c_gc3_lean_flex,c1_cast_bf16,c_gc3_lean_bf16,c1_nd_bf16,c_gc_lean,c1_flex_bf16
"$python" benchmarks/gpu_train.py --shapes 8b --profiles chat --arms "$arms" --steps 30 --warmup 3 \
  --timeout 300 --deadline-s "${DEADLINE_S:-520}" --out "$out/gpu_train-8b-chat.json" "$@"
