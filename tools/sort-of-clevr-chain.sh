#!/usr/bin/env bash
# Sort-of-CLEVR by a chain of short runs, each from the last one's weights
# (`init_from`) with its own warm-up and cosine: shape, then left/right
# alone, then top/bottom alone, then the three non-relational types, then
# everything (configs/sort-of-clevr-chain-*.json, docs/benchmarks.md "A chain of
# runs"). About 50 min on one core. Safe to run twice: a finished stage
# (its model.safetensors) is kept, an interrupted one resumes from its
# checkpoint.
#
#   tools/sort-of-clevr-chain.sh            # train the chain, then test it
#   THREADS=2 tools/sort-of-clevr-chain.sh  # threads per run (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/autoglm
D=target/sort-of-clevr
OUT=target/soc-chain
THREADS=${THREADS:-1}

[ -x "$BIN" ] || cargo build --release -p autoglm-cli
[ -f "$D/train.jsonl" ] || "$BIN" data sort-of-clevr --out "$D"
for s in train test; do
  for t in horizontal vertical; do
    f="$D/$s-$t.jsonl"
    [ -s "$f" ] || { grep "\"type\":\"$t\"" "$D/$s.jsonl" > "$f.tmp" && mv "$f.tmp" "$f"; }
  done
done

mkdir -p "$OUT"
for stage in 1-shape 2-horizontal 3-vertical 4-non-relational 5-all; do
  dir="$OUT/$stage"
  if [ -f "$dir/model.safetensors" ]; then
    echo "$stage: done before, kept ($dir)"
    continue
  fi
  resume=()
  [ -f "$dir/checkpoint.safetensors" ] && resume=(--resume)
  echo "$stage: training into $dir (log: $dir.log)"
  RAYON_NUM_THREADS=$THREADS "$BIN" train --config "configs/sort-of-clevr-chain-$stage.json" \
    --out "$dir" "${resume[@]}" > "$dir.log" 2>&1
done

for k in relational non-relational; do
  echo "test-$k:"
  RAYON_NUM_THREADS=$THREADS "$BIN" eval --model "$OUT/5-all" --data "$D/test-$k.jsonl"
done
