"""PyTorch side of `autoglm bench encoders`: times EfficientNet-Lite0
(efficientnet-lite-pytorch) and all-MiniLM-L6-v2 (sentence-transformers) on
the exact inputs the Rust side wrote to --dir, with the same thread count,
and prints one JSON document of seconds per batch (median).

Called by `autoglm bench encoders --python VENV/bin/python`; not meant to be
run alone, but it can be: --dir must hold pixels_b32.safetensors and
sentences.json.
"""
import argparse
import json
import os
import statistics
import time

import torch
from safetensors.torch import load_file

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True)
ap.add_argument("--threads", type=int, required=True)
ap.add_argument("--seconds", type=float, default=3.0)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.set_num_interop_threads(1)
HOME = os.environ.get("AUTOGLM_HOME", os.path.expanduser("~/.cache/autoglm"))


def timeit(fn, seconds):
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


from efficientnet_lite_pytorch import EfficientNet
from sentence_transformers import SentenceTransformer

eff = EfficientNet.from_pretrained("efficientnet-lite0",
                                   weights_path=os.path.join(HOME, "efficientnet-lite0", "efficientnet-lite0.pth")).eval()
pixels = load_file(os.path.join(args.dir, "pixels_b32.safetensors"))["pixels"]
st = SentenceTransformer(os.path.join(HOME, "minilm"), device="cpu")
sentences = json.load(open(os.path.join(args.dir, "sentences.json")))
out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
with torch.inference_mode():
    out["effnet_b1"] = timeit(lambda: eff(pixels[:1]), args.seconds)
    out["effnet_b32"] = timeit(lambda: eff(pixels), args.seconds)
    out["minilm_b1"] = timeit(lambda: st.encode(sentences[:1], batch_size=1), args.seconds)
    out["minilm_b64"] = timeit(lambda: st.encode(sentences, batch_size=64), args.seconds)
print(json.dumps(out))
