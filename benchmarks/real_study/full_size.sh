#!/usr/bin/env bash
# The real-model campaign at full size (300 items, 10 seeds, every k, the noise profile,
# Iterative Pruning and the one-shot baselines on every run) on a machine with one GPU.
#
#     bash benchmarks/real_study/full_size.sh            # from the repository root
#     HOURS=8 bash benchmarks/real_study/full_size.sh    # stop cleanly before 8 hours
#
# Installs dpjax with JAX's CUDA wheels, prints every unit's predicted time (`--dry_run`;
# the predictions calibrate themselves on the units that finish), runs the plan in
# priority order and writes its runs, ledger, REPORT.md and VERDICT.md to
# benchmarks/real_study/full/, the same layout as the two-core campaign, whose files are
# committed as they are. Where $OUT is set (a machine that hands back a folder), a copy
# of benchmarks/real_study/full/ is left there too. A rerun continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python -c "import jax, dpjax" 2>/dev/null; then
  pip install --quiet -e '.[cuda,gguf]'
fi
python -c "import jax; print('devices:', jax.devices())"
python -m benchmarks.real_study --size=full --dry_run
python -m benchmarks.real_study --size=full --hours="${HOURS:-0}"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  tar -C benchmarks/real_study -czf "$OUT/full.tar.gz" --exclude='*/state' \
    --exclude='*/readouts.npz' --exclude='models' full
fi
