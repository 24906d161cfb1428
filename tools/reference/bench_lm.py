"""PyTorch side of `autoglm bench lm`: loads the random LLaVA checkpoint the
Rust side wrote to --dir with transformers, and serves timing requests on
stdin ("CASE SECONDS", one JSON line back per request) so that the two sides
are measured interleaved:

  prefill  one forward pass over a 128-token prompt (batch 1)
  decode   64 greedy steps with the KV cache after a 16-token prompt, per token
  ask      LlavaProcessor + generate (16 new tokens) on a 224×224 photo

Not meant to be run alone.
"""
import argparse
import time

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from bench_common import serve

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True)
ap.add_argument("--image", required=True)
ap.add_argument("--threads", type=int, required=True)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.set_num_interop_threads(1)

model = LlavaForConditionalGeneration.from_pretrained(args.dir, dtype=torch.float32).eval()
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = 0
processor = AutoProcessor.from_pretrained(args.dir)
image = Image.open(args.image).convert("RGB")
prompt_long = torch.arange(5, 5 + 128).unsqueeze(0) % 300 + 5
prompt_short = prompt_long[:, :16]


def prefill():
    model(input_ids=prompt_long, use_cache=False)


def decode():
    out = model(input_ids=prompt_short, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(64):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / 64


def ask():
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)




cases = {"prefill": prefill, "decode": decode, "ask": ask}
with torch.inference_mode():
    serve(cases, {"torch": torch.__version__, "threads": torch.get_num_threads()})
