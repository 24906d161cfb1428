#!/usr/bin/env bash
# The demo (README): classify and embed the real sample photos with
# EfficientNet-Lite0, embed sentences with all-MiniLM-L6-v2, then ask the
# default model (models/autoglm-tiny) about sample easy-VQA images and
# measure its accuracy on the easy-VQA test split.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v cargo >/dev/null || { echo "demo: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }
scripts/fetch-assets.sh
cargo build --release --locked -p autoglm-cli
AUTOGLM=target/release/autoglm
PHOTOS=${AUTOGLM_HOME:-$HOME/.cache/autoglm}/photos
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}

echo; echo "== installed assets"; $AUTOGLM assets list
echo; echo "== classify the sample photos (EfficientNet-Lite0, ImageNet-1k, top 3)"
$AUTOGLM classify --top-k 3 "$PHOTOS"/chelsea.png "$PHOTOS"/coffee.png "$PHOTOS"/astronaut.png \
    "$PHOTOS"/motorcycle_left.png "$PHOTOS"/rocket.jpg "$PHOTOS"/camera.png
echo; echo "== embed the photos (EfficientNet-Lite0 pooled features, unit length)"
$AUTOGLM embed image "$PHOTOS"/chelsea.png "$PHOTOS"/coffee.png "$PHOTOS"/rocket.jpg
echo; echo "== embed sentences (all-MiniLM-L6-v2, unit length)"
$AUTOGLM embed text "A cat sleeps on the sofa." "Un chat dort sur le canapé." "The rocket lifts off."
echo; echo "== the same as JSON (one document on stdout), cosine of the first two:"
$AUTOGLM embed text --json "A cat sleeps on the sofa." "Un chat dort sur le canapé." \
  | python3 -c 'import json,sys; e=[x["embedding"] for x in json.load(sys.stdin)["embeddings"]]; print(round(sum(a*b for a,b in zip(*e)),4))'

MODEL=models/autoglm-tiny
SAMPLES=assets/samples/easy-vqa
echo; echo "== ask the default model ($MODEL) about sample easy-VQA test images"
python3 -c 'import json,sys
for l in open(sys.argv[1]).readlines()[:9]:
    r = json.loads(l); print(r["image"], r["answer"], r["question"], sep="\t")' "$SAMPLES/questions.jsonl" |
while IFS=$'\t' read -r image expected question; do
    answer=$($AUTOGLM ask --image "$SAMPLES/$image" "$question" 2>/dev/null) ||
        { $AUTOGLM ask --image "$SAMPLES/$image" "$question" >/dev/null; exit 1; }
    printf '%-8s %-42s -> %-10s (expected %s)\n' "$image" "$question" "$answer" "$expected"
done
echo; echo "== the default model on all 18 sample questions, then on the whole easy-VQA test split"
$AUTOGLM eval --data "$SAMPLES/questions.jsonl" --confusion "${TMPDIR:-/tmp}/autoglm-samples-confusion.png"
$AUTOGLM eval --split test --confusion "${TMPDIR:-/tmp}/autoglm-test-confusion.png"

echo; echo "== serve the default model over the OpenAI API, ask it over HTTP, stop it"
LOG=$(mktemp)
AUTOGLM_API_KEYS=sk-demo-key-123 $AUTOGLM serve --port 0 --embedding-model none >"$LOG" 2>/dev/null &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 100); do grep -q "listening on" "$LOG" && break; sleep 0.1; done
BASE=$(sed -n 's/^listening on //p' "$LOG")
[[ -n $BASE ]] || { echo "demo: the server did not start" >&2; exit 1; }
echo "listening on $BASE"
python3 - "$BASE" "$SAMPLES/21.png" <<'PY'
import base64, json, sys, urllib.request
base, image = sys.argv[1], sys.argv[2]
url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
body = {"model": "autoglm-tiny", "temperature": 0, "messages": [{"role": "user", "content": [
    {"type": "text", "text": "what shape is in the image?"},
    {"type": "image_url", "image_url": {"url": url}}]}]}
req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                             {"content-type": "application/json", "authorization": "Bearer sk-demo-key-123"})
r = json.load(urllib.request.urlopen(req))
print("POST /v1/chat/completions:", image, "what shape is in the image? ->", r["choices"][0]["message"]["content"], "| usage", r["usage"])
PY
kill -TERM $SERVER && wait $SERVER && echo "stopped on SIGTERM"

echo; echo "== ground answers in WordNet: photo → ImageNet class → synset → chain → the kg-reader model answers"
[[ -f ${AUTOGLM_HOME:-$HOME/.cache/autoglm}/kg/wordnet.nq ]] || $AUTOGLM kg import-wordnet
$AUTOGLM ask --kg wordnet --image "$PHOTOS/chelsea.png" "Is this an animal?"
$AUTOGLM ask --kg wordnet --image "$PHOTOS/chelsea.png" "Does it have a tail?"
$AUTOGLM ask --kg wordnet --image "$PHOTOS/motorcycle_left.png" "Is this a motor vehicle?" --explain
