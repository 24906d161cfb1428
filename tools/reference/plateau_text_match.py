"""Is the yes/no plateau ours or the architecture's? Trains transformers'
LlamaForCausalLM — the default model's decoder (3 layers, width 128, 4 heads,
2 KV heads), on the tokenizer of a model directory — on a text-only version
of easy-VQA's colour yes/no questions, where the colour is stated in the
question ("the shape is blue. is there a red shape?"), and prints held-out
exact match every 100 steps.

  python tools/reference/plateau_text_match.py MODEL_DIR [INIT_STD] [SEED]

Measured (docs/benchmarks.md): with HF's initializer_range 0.02 it stays at
the question-only prior (86.4 %) for 600 steps; with 0.1 it leaves it after
300-600 steps depending on the seed.
"""
import json, os, random, re, sys

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

model_dir = sys.argv[1]
init = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
torch.set_num_threads(1)
torch.manual_seed(seed)
random.seed(seed)

home = os.environ.get("AUTOGLM_HOME", os.path.expanduser("~/.cache/autoglm"))
questions = json.load(open(f"{home}/easy-vqa/train/questions.json"))
colour = {i: a for q, a, i in questions if "color" in q and a not in ("yes", "no")}
rows = [(f"the shape is {colour[i]}. {q}", a) for q, a, i in questions
        if a in ("yes", "no") and i in colour
        and re.search(r"\b(red|green|blue|black|gray|teal|brown|yellow)\b", q)]

tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
text = json.load(open(f"{model_dir}/config.json"))["text_config"]
text.pop("model_type", None)
model = LlamaForCausalLM(LlamaConfig(**text, initializer_range=init))
end = tok.token_to_id("<|im_end|>")


def encode(q, a):
    p = tok.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    return p, tok.encode(a, add_special_tokens=False).ids + [end]


data = [encode(q, a) for q, a in rows]
random.shuffle(data)
held, train = data[:500], data[500:]


def batch(rs):
    t = max(len(p) + len(a) - 1 for p, a in rs)
    ids = torch.zeros(len(rs), t, dtype=torch.long)
    labels = torch.full((len(rs), t), -100)
    for i, (p, a) in enumerate(rs):
        s = p + a[:-1]
        ids[i, :len(s)] = torch.tensor(s)
        for k, x in enumerate(a):
            labels[i, len(p) - 1 + k] = x
    return ids, labels


opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
for step in range(600):
    for g in opt.param_groups:
        g["lr"] = 2e-3 * min(1, (step + 1) / 50)
    ids, labels = batch(random.sample(train, 32))
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if (step + 1) % 100 == 0:
        with torch.no_grad():
            ids, labels = batch(held)
            pred = model(input_ids=ids).logits.argmax(-1)
            ok = ((pred == labels) | (labels == -100)).all(1).float().mean().item()
        print(f"step {step + 1}  loss {loss.item():.4f}  held-out exact match {ok:.4f}", flush=True)
