#!/usr/bin/env bash
# The projector ablation of docs/benchmarks.md: train each variant on
# easy-VQA with the same decoder, data, seed and steps, evaluate it on the
# whole test split, and print the table (markdown) and results.jsonl.
#
# Usage: [JOBS=N] scripts/ablation.sh [OUT_DIR] [STEPS]
#   OUT_DIR  where the models go (default target/ablation)
#   STEPS    optimizer steps per variant, batch 32 (default 2000)
#   TEXT_FIRST  true (default): the question before the image, as the
#            default model; false: LLaVA's order
#   ONLY     space-separated variant names to train and evaluate (default:
#            all); the table lists every variant that has results
#   JOBS     variants trained at a time, one thread each (default 2: on a
#            model this small, two single-threaded runs get more done than
#            one run on two threads)
# A variant whose train_summary.json exists is not trained again; an
# interrupted one resumes from its checkpoint.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-target/ablation}
STEPS=${2:-2000}
JOBS=${JOBS:-2}
TEXT_FIRST=${TEXT_FIRST:-true}
ONLY=${ONLY:-}
AUTOGLM=target/release/autoglm
cargo build --release --locked -p autoglm-cli
scripts/fetch-assets.sh --only easy-vqa,efficientnet-lite0,fonts >/dev/null
mkdir -p "$OUT"

# name vision projector blind
VARIANTS=(
  "blind vit mlp true"
  "vit-none vit none false"
  "vit-linear vit linear false"
  "vit-mlp vit mlp false"
  "vit-adapter vit adapter false"
  "effnet-linear efficientnet-lite0 linear false"
  "effnet-mlp efficientnet-lite0 mlp false"
  "effnet-adapter efficientnet-lite0 adapter false"
)

config() { # name vision projector blind
    # The default model's recipe (configs/autoglm-tiny.json) but for the
    # vision tower, the projector and the steps. EfficientNet at 64² gives
    # 2×2 = 4 image tokens; the ViT 4×4 patches + the class token.
    cat <<JSON
{"data": {"kind": "easy-vqa"}, "vision": "$2", "blind": $4, "image_after_question": $TEXT_FIRST,
 "image_size": 64, "patch_size": 16, "vision_hidden": 128, "vision_layers": 3, "vision_heads": 4,
 "projector": "$3",
 "text_hidden": 128, "text_layers": 3, "text_heads": 4, "text_kv_heads": 2, "vocab_size": 600,
 "steps": $STEPS, "batch_size": 32, "peak_lr": 2e-3, "warmup_steps": 100, "clip_norm": 1.0,
 "open_first_steps": 300, "seed": 0, "eval_every": 250, "checkpoint_every": 500}
JSON
}

train_one() { # name vision projector blind
    local dir=$OUT/$1
    if [[ -f $dir/train_summary.json ]]; then return; fi
    config "$@" >"$OUT/$1.json"
    RAYON_NUM_THREADS=1 $AUTOGLM train --config "$OUT/$1.json" --out "$dir" \
        $([[ -f $dir/checkpoint.safetensors ]] && echo --resume) >"$OUT/$1.log" 2>&1
    echo "trained $1"
}

selected() { [[ -z $ONLY || " $ONLY " == *" $1 "* ]]; }

pending=()
for v in "${VARIANTS[@]}"; do
    selected "${v%% *}" || continue
    # shellcheck disable=SC2086
    train_one $v &
    pending+=($!)
    if (( ${#pending[@]} == JOBS )); then
        for p in "${pending[@]}"; do wait "$p" || { echo "ablation: a run failed; see $OUT/*.log" >&2; exit 1; }; done
        pending=()
    fi
done
for p in "${pending[@]}"; do wait "$p" || { echo "ablation: a run failed; see $OUT/*.log" >&2; exit 1; }; done

: >"$OUT/results.jsonl"
for v in "${VARIANTS[@]}"; do
    read -r name _ <<<"$v"
    [[ -f $OUT/$name/train_summary.json ]] || continue
    if [[ ! -f $OUT/$name/eval.json ]] && selected "$name"; then
        RAYON_NUM_THREADS=2 $AUTOGLM eval --json --model "$OUT/$name" --split test \
            --confusion "$OUT/$name/confusion.png" >"$OUT/$name/eval.json.tmp"
        mv "$OUT/$name/eval.json.tmp" "$OUT/$name/eval.json"
    fi
    [[ -f $OUT/$name/eval.json ]] || continue
    python3 - "$name" "$OUT/$name" >>"$OUT/results.jsonl" <<'PY'
import json, sys
name, d = sys.argv[1], sys.argv[2]
e = json.load(open(f"{d}/eval.json")); s = json.load(open(f"{d}/train_summary.json"))
print(json.dumps({"variant": name, "accuracy": e["accuracy"], "per_type": e["per_type"],
                  "trainable_params": s["trainable_params"], "frozen_params": s["frozen_params"],
                  "train_seconds": s["train_seconds"], "steps": s["steps"]}))
PY
done

python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| variant | test exact match | yes/no | color | shape | trainable params | frozen params | training time |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    t = r["per_type"]
    pct = lambda k: f'{100 * t[k][1]:.2f} %' if k in t else "—"
    print(f'| {r["variant"]} | {100 * r["accuracy"]:.2f} % | {pct("yes/no")} | {pct("color")} | {pct("shape")} '
          f'| {r["trainable_params"] / 1e6:.2f} M | {r["frozen_params"] / 1e6:.2f} M | {r["train_seconds"] / 60:.1f} min |')
PY
