"""PyTorch side of `autoglm bench train`: the architecture of --model's
config.json as transformers' LlavaForConditionalGeneration (fresh weights,
N(0, 0.02) as the Rust side), trained on the batch the Rust side wrote
(--batch: input_ids, labels, pixel_values). Serves timing requests on stdin
("step SECONDS", one JSON line back each) so both sides run interleaved.
One step: forward, loss, backward, clip_grad_norm_(1.0), AdamW step.

Not meant to be run alone.
"""
import argparse

import torch
from safetensors.torch import load_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

from bench_common import serve

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--batch", required=True)
ap.add_argument("--threads", type=int, required=True)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.set_num_interop_threads(1)
torch.manual_seed(0)

config = LlavaConfig.from_pretrained(args.model)
model = LlavaForConditionalGeneration(config).train()
batch = load_file(args.batch)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def step():
    opt.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()




params = sum(p.numel() for p in model.parameters())
serve({"step": step}, {"torch": torch.__version__, "threads": torch.get_num_threads(), "params": params})
