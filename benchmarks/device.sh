#!/usr/bin/env bash
# The bench on a lent accelerator, as one prepared call (the machine has JAX, optax, equinox and
# chex; bilevel_jax runs from the checkout, nothing is installed):
#
#     bash benchmarks/device.sh                 # writes $OUT/bench.json, $OUT/bench.md, $OUT/log.txt
#
# Sections: per-preset step time, the plain-JAX references, benchmark_bilevel's quadratic, the
# copy bandwidth, cold compile time, the bfloat16 / float16 / float32 precision table and
# mode="fwd" against "rev" for the second-order products at three MLP widths, and the data-parallel
# steps (mesh=) on 1, 2, 4 ... of the machine's GPUs (jaxopt's section is left out: it needs jaxopt). BENCH_ARGS adds options (e.g. "--quick" for a smoke run);
# BENCH_TIMEOUT (seconds, default 480) stops the bench in time for the files to come back.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-results/bench-device}"
mkdir -p "$OUT"
python3 -c "import jax; print('devices:', jax.devices())" | tee "$OUT/log.txt"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-480}" python3 -m benchmarks --only steps,reference,bilevel,bandwidth,compile,precision,second_order,scaling \
    --presets soba,saba,amigo,stocbio,mrbo --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/log.txt"
