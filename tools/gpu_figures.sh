#!/usr/bin/env bash
# The figures BENCHMARKS.md gives for a GPU, in one run: the fit loop's step over 1 to 512 rows
# (and its peak memory with 256-token segments, fit_memory, which sizes a GPU's --batch-size),
# batched decoding of memory segments, `compress --tokens 32` (segments fitted per second) and
# `decompress` of the first 6,400 bytes of alice29.txt, and `--method lm` both ways on its first
# 12,000 bytes, every archive decoded and compared with its input. The lm kind's arithmetic runs
# on the CPU wherever the model is (lmzip/exact), so its two steps time the GPU machine's CPU and
# give an archive to compare, byte for byte, with one made elsewhere; lm_exact runs that
# arithmetic on the device itself, and its digests must be a CPU's (BENCHMARKS.md has them).
#
#   tools/gpu_figures.sh TEXT OUT [embedded|tiny]
#
# TEXT is alice29.txt; OUT a folder for the logs and archives (mem6k.lmz and lm12k.lmz, to
# decode on another machine). `tiny` runs the same steps on the test model (host work only:
# its arithmetic is negligible). Environment: DEVICE (cuda, the default, or cpu, which hides the
# GPUs from lmzip too; lmzip itself takes the first visible GPU, so pick one with
# CUDA_VISIBLE_DEVICES), PYTHON (default python3), STEPS (the names of the steps to run, default
# all) and LIMIT_* (each step's time limit in seconds, below), so one that hangs costs only itself.
# On an H200 (embedded model) fit_steps took 52 s, decode_speed 49 s, memory_compress 109 s and
# memory_decompress 17 s, model loads included; lm_compress ran past 90 s on that machine's CPU.
set -u
steps_known="fit_steps fit_memory decode_speed memory_compress memory_decompress lm_compress lm_decompress lm_exact"
if [ $# -lt 2 ] || [[ ! " embedded tiny " == *" ${3:-embedded} "* ]]; then
    echo "usage: $0 TEXT OUT [embedded|tiny]" >&2
    exit 2
fi
for name in ${STEPS:-}; do
    [[ " $steps_known " == *" $name "* ]] || { echo "$0: unknown step '$name' (steps: $steps_known)" >&2; exit 2; }
done
text=$1 out=$2 model=${3:-embedded}
device=${DEVICE:-cuda} py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
[ "$device" = cpu ] && export CUDA_VISIBLE_DEVICES=
mkdir -p "$out"
if [ "$model" = tiny ]; then
    model_args=(--model "$here/tests/data/tiny-llama") fit_model=tiny
else
    model_args=() fit_model=embedded
fi
failed=0

step() {  # step NAME LIMIT COMMAND...: runs it under a limit, its output to OUT/NAME.log too
    local name=$1 limit=$2; shift 2
    [[ " ${STEPS:-$name} " == *" $name "* ]] || return 1
    echo "== $name (limit ${limit} s): $*"
    local started=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - started)) s"
    [ "$status" = 0 ] || failed=1
    return "$status"
}

same() {  # same ORIGINAL DECODED
    if cmp "$1" "$2"; then echo "== $(basename "$2"): decoded exactly"; else failed=1; fi
}

step fit_steps "${LIMIT_FIT:-120}" "$py" "$here/tools/fit_step_time.py" --model "$fit_model" --device "$device" \
    --bf16 --rows 1 8 64 256 512 --steps 20
step fit_memory "${LIMIT_FIT:-120}" "$py" "$here/tools/fit_step_time.py" --model "$fit_model" --device "$device" \
    --bf16 --rows 1 16 64 --tokens 256 --steps 6
step decode_speed "${LIMIT_DECODE:-90}" "$py" "$here/tools/decode_speed.py" ${model_args[@]+"${model_args[@]}"} \
    --device "$device" --segments 512 --tokens 32 --batch-sizes 1 64 128 512 --single-segments 8

rm -rf "$out"/mem6k.* "$out"/lm12k.*
head -c 6400 "$text" > "$out/mem6k.txt"
step memory_compress "${LIMIT_MEMORY:-150}" "$py" -m lmzip compress -f -v ${model_args[@]+"${model_args[@]}"} \
    --tokens 32 --batch-size 128 "$out/mem6k.txt" -o "$out/mem6k.lmz" \
    && "$py" -m lmzip info "$out/mem6k.lmz" | head -12
step memory_decompress "${LIMIT_DECODE:-90}" "$py" -m lmzip decompress -f -v ${model_args[@]+"${model_args[@]}"} \
    "$out/mem6k.lmz" -o "$out/mem6k.out" && same "$out/mem6k.txt" "$out/mem6k.out"

head -c 12000 "$text" > "$out/lm12k.txt"
step lm_compress "${LIMIT_LM:-90}" "$py" -m lmzip compress -f --method lm ${model_args[@]+"${model_args[@]}"} \
    "$out/lm12k.txt" -o "$out/lm12k.lmz" && sha256sum "$out/lm12k.lmz"
step lm_decompress "${LIMIT_LM:-90}" "$py" -m lmzip decompress -f ${model_args[@]+"${model_args[@]}"} \
    "$out/lm12k.lmz" -o "$out/lm12k.out" && same "$out/lm12k.txt" "$out/lm12k.out"
step lm_exact "${LIMIT_EXACT:-150}" "$py" "$here/tools/exact_speed.py" "$text" ${model_args[@]+"${model_args[@]}"} \
    --device "$device" --rows 1 10 --context 1000 --steps 8 --passes 1024 2047
exit $failed
