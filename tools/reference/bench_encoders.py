"""PyTorch side of `autoglm bench encoders`: times EfficientNet-Lite0
(efficientnet-lite-pytorch) and all-MiniLM-L6-v2 (sentence-transformers) on
the exact inputs the Rust side wrote to --dir, with the same thread count.
It serves timing requests on stdin (one case at a time) so the two sides'
measurements can be interleaved: on a shared machine whose speed drifts,
back-to-back blocks would bias the ratio.

Called by `autoglm bench encoders --python VENV/bin/python`; not meant to be
run alone, but it can be: --dir must hold pixels_b32.safetensors and
sentences.json.
"""
import argparse
import json
import os

import torch
from safetensors.torch import load_file

from bench_common import serve

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True)
ap.add_argument("--threads", type=int, required=True)
ap.add_argument("--seconds", type=float, default=3.0)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.set_num_interop_threads(1)
HOME = os.environ.get("AUTOGLM_HOME", os.path.expanduser("~/.cache/autoglm"))




from efficientnet_lite_pytorch import EfficientNet
from sentence_transformers import SentenceTransformer

eff = EfficientNet.from_pretrained("efficientnet-lite0",
                                   weights_path=os.path.join(HOME, "efficientnet-lite0", "efficientnet-lite0.pth")).eval()
pixels = load_file(os.path.join(args.dir, "pixels_b32.safetensors"))["pixels"]
st = SentenceTransformer(os.path.join(HOME, "minilm"), device="cpu")
sentences = json.load(open(os.path.join(args.dir, "sentences.json")))
cases = {
    "effnet_b1": lambda: eff(pixels[:1]),
    "effnet_b32": lambda: eff(pixels),
    "minilm_b1": lambda: st.encode(sentences[:1], batch_size=1),
    "minilm_b64": lambda: st.encode(sentences, batch_size=64),
}
# Protocol: print a ready line, then for each request line "CASE SECONDS"
# answer with one JSON line {"case": ..., "seconds_per_call": ...}, so that
# the Rust side can interleave its own measurements with ours.
with torch.inference_mode():
    serve(cases, {"torch": torch.__version__, "threads": torch.get_num_threads()})
