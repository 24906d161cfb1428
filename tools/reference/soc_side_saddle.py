"""A PyTorch replica of the Sort-of-CLEVR left/right run on perfect tokens
(`oracle_scenes` with `configs/sort-of-clevr-stage4-horizontal.json`), to tell
our code from the model: docs/benchmarks.md, "Left/right: a saddle".

The tokens: an 8 x 8 grid, each object's colour and shape one-hot on the cell
of its centre, every cell's (x, y) in [-1, 1] last (82 wide, as the tower's
stage-4 tokens with coordinates). The model: an MLP projector, then a 3-layer
Llama decoder (128 wide, 4 heads / 2 kv heads, SwiGLU 512, RMSNorm, RoPE),
all image tokens at one rotary position, tied embeddings, weights N(0, 1/fan-in);
AdamW at 1e-3 (decay 0.01, none on norms), warmup 50, cosine to 5e-5, global
norm clip 1, 32 questions of 8 images a step. It prints the accuracy on the
left/right questions of 100 unseen scenes.

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch
    /tmp/tv/bin/python tools/reference/soc_side_saddle.py --seed 1 --coords all       # ~4 min a 1,000 steps, one core
    /tmp/tv/bin/python tools/reference/soc_side_saddle.py --seed 1 --coords occupied  # (x, y) only on cells that hold an object
    /tmp/tv/bin/python tools/reference/soc_side_saddle.py --seed 1 --coords product   # also each channel times x and times y
"""
import math, random, argparse, time
import torch, torch.nn as nn, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=1000)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--coords", default="all", choices=["all", "occupied", "product", "onehot"])
p.add_argument("--coord-scale", type=float, default=1.0)
p.add_argument("--feat", type=int, default=82)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--layers", type=int, default=3)
p.add_argument("--qk-norm", action="store_true")
p.add_argument("--eval-every", type=int, default=250)
p.add_argument("--task", default="side", choices=["side", "closest", "furthest", "relation", "shape", "mix", "mix-colour"],
               help="left/right, or the shape of the object closest to / furthest from the named one (relation: both; shape: the named one's; mix: shape, closest, furthest; mix-colour: those and the colour of the closest and of the furthest)")
p.add_argument("--shape-steps", type=int, default=0,
               help="with --task mix: shape questions alone for this many steps first")
p.add_argument("--colour-steps", type=int, default=0,
               help="with --task mix-colour: after the shape steps, shape and the closest's and furthest's colours alone for this many steps")
p.add_argument("--fourier", type=int, default=0,
               help="also sin, cos of every cell's x and y at pi/2, pi, 2pi, ... (vision_token_coord_fourier)")
p.add_argument("--image-mask", default="causal", choices=["causal", "bidirectional"],
               help="bidirectional: the image tokens attend to each other both ways in the decoder (a prefix-LM mask)")
p.add_argument("--mixer", type=int, default=0,
               help="this many bidirectional transformer layers over the projected image tokens before the decoder")
p.add_argument("--distance-bias", type=float, default=0.0,
               help="in the mixer layers, add slope_h * |p_i - p_j|^2 (the cells' (x, y)) to every logit, slopes learned per head from -S, -S, +S, +S")
p.add_argument("--gated-mixer", action="store_true",
               help="each mixer layer adds its attention and feed-forward through tanh gates starting at 0 (image_self_attention_layers)")
p.add_argument("--occupied-keys", action="store_true",
               help="in the mixer layers, only cells that hold an object are keys (an oracle objectness mask)")
p.add_argument("--aux-nearest", type=float, default=0.0,
               help="add this weight times a loss on the mixer's output at every object's cell: a linear probe predicts its nearest and its furthest other object's shapes")
p.add_argument("--neighbour-features", action="store_true",
               help="an oracle: every object's cell also holds its nearest and its furthest other object's colour and shape, one-hot (channels 40-55)")
p.add_argument("--aux-detach", action="store_true",
               help="with --aux-nearest: the mixer reads the projected tokens detached and the probe reads only what the mixer adds, so the probe's loss trains the mixer alone")
p.add_argument("--gate-init", type=float, default=0.0,
               help="with --gated-mixer: the mixer's gates start here (gate_init)")
p.add_argument("--no-self", action="store_true", help="in the mixer layers, a token does not attend to itself")
p.add_argument("--attn-scale", type=float, default=1.0,
               help="multiply every attention logit by this (1: q.k / sqrt(d))")
a = p.parse_args()
torch.manual_seed(a.seed); random.seed(a.seed)
torch.set_num_threads(1)
G, SIZE, HALF, N = 8, 75, 5, 6

def scene(rng):
    objs = []
    for c in range(N):
        while True:
            x = rng.randrange(HALF, SIZE - HALF); y = rng.randrange(HALF, SIZE - HALF)
            if all((o[1]-x)**2 + (o[2]-y)**2 >= (2*HALF)**2 for o in objs): break
        objs.append((c, x, y, rng.random() < 0.5))
    return objs

rng = random.Random(1)
train = [scene(rng) for _ in range(9700)]
held = [scene(rng) for _ in range(100)]

def at(i): return (2*i + 1) / G - 1.0
def features(objs):
    f = torch.zeros(G*G, a.feat + 3)
    occ = torch.zeros(G*G)
    for c, x, y, circ in objs:
        cell = (y*G//SIZE)*G + x*G//SIZE
        f[cell, c] += 1; f[cell, N + int(circ)] += 1; occ[cell] = 1
    xs = torch.tensor([at(k % G) for k in range(G*G)]); ys = torch.tensor([at(k // G) for k in range(G*G)])
    if a.coords in ("all", "occupied"):
        m = occ if a.coords == "occupied" else torch.ones(G*G)
        f[:, a.feat-2] = xs * m * a.coord_scale; f[:, a.feat-1] = ys * m * a.coord_scale
    elif a.coords == "product":
        f[:, a.feat-2] = xs; f[:, a.feat-1] = ys
        f[:, 8:16] = f[:, :8] * xs[:, None]; f[:, 16:24] = f[:, :8] * ys[:, None]
    elif a.coords == "onehot":
        for k in range(G*G):
            f[k, 8 + k % G] = 1; f[k, 16 + k // G] = 1
    for j in range(a.fourier):
        w = math.pi / 2 * 2 ** j
        for i, c in enumerate((xs, ys)):
            f[:, 24 + 4*j + 2*i] = (w * c).sin(); f[:, 25 + 4*j + 2*i] = (w * c).cos()
    f[:, a.feat] = occ  # not features: the oracle mask and the probe's labels, dropped before the projector
    for c, x, y, circ in objs:
        d = {o[0]: (o[1]-x)**2 + (o[2]-y)**2 for o in objs if o[0] != c}
        cell = (y*G//SIZE)*G + x*G//SIZE
        near, far = objs[min(d, key=d.get)], objs[max(d, key=d.get)]
        f[cell, a.feat + 1] = float(near[3]); f[cell, a.feat + 2] = float(far[3])
        if a.neighbour_features:
            for base, o in ((40, near), (48, far)):
                f[cell, base + o[0]] = 1; f[cell, base + 6 + int(o[3])] = 1
    return f

# vocabulary: template words + colours + answers
words = ["<pad>", "<im_start>", "user", "\n", "<image>", "<im_end>", "assistant", "Is", "the", "object", "on",
         "left", "or", "right", "of", "image", "?", "What", "is", "shape", "square", "circle",
         "red", "green", "blue", "orange", "gray", "yellow", "closest", "to", "furthest", "from", "colour"]
V = {w: i for i, w in enumerate(words)}
COL = ["red", "green", "blue", "orange", "gray", "yellow"]

def question(objs, c, task):
    if task == "relation":  # one of the two, fixed for each scene and colour
        task = "closest" if (objs[c][1] + objs[c][2]) % 2 == 0 else "furthest"
    if task == "shape":
        q = ["What", "is", "the", "shape", "of", "the", COL[c], "object", "?"]
        return q, ("circle" if objs[c][3] else "square")
    if task != "side":
        rel, _, attr = task.partition("-")
        d = {o[0]: (o[1]-objs[c][1])**2 + (o[2]-objs[c][2])**2 for o in objs if o[0] != c}
        pick = (min if rel == "closest" else max)(d, key=d.get)
        link = ["closest", "to"] if rel == "closest" else ["furthest", "from"]
        q = ["What", "is", "the", attr or "shape", "of", "the", "object"] + link + ["the", COL[c], "object", "?"]
        if attr == "colour": return q, COL[pick]
        return q, ("circle" if objs[pick][3] else "square")
    q = ["Is", "the", COL[c], "object", "on", "the", "left", "or", "right", "of", "the", "image", "?"]
    return q, ("left" if objs[c][1] < SIZE // 2 else "right")

def example(objs, c, task):
    q, ans = question(objs, c, task)
    pre = ["<im_start>", "user", "\n"]
    post = ["\n"] + q + ["<im_end>", "\n", "<im_start>", "assistant", "\n"]
    return [V[w] for w in pre], [V[w] for w in post], [V[ans], V["<im_end>"]]

H, NH, KV, FF = 128, 4, 2, 512
HD = H // NH

def rope(x, pos):  # x: (B, h, T, d)
    inv = 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))
    ang = pos[:, None].float() * inv[None]  # T, d/2
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : HD // 2], x[..., HD // 2 :]
    cos = torch.cat([cos, cos], -1); sin = torch.cat([sin, sin], -1)
    rot = torch.cat([-x2, x1], -1)
    return x * cos + rot * sin

class RMS(nn.Module):
    def __init__(s, d): super().__init__(); s.weight = nn.Parameter(torch.ones(d))
    def forward(s, x): return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * s.weight

class Layer(nn.Module):
    def __init__(s):
        super().__init__()
        s.n1, s.n2 = RMS(H), RMS(H)
        s.q = nn.Linear(H, H, bias=False); s.k = nn.Linear(H, KV*HD, bias=False); s.v = nn.Linear(H, KV*HD, bias=False)
        s.o = nn.Linear(H, H, bias=False)
        s.g = nn.Linear(H, FF, bias=False); s.u = nn.Linear(H, FF, bias=False); s.d = nn.Linear(FF, H, bias=False)
        if a.qk_norm: s.qn, s.kn = RMS(HD), RMS(HD)
        s.ga = nn.Parameter(torch.full((1,), a.gate_init)); s.gf = nn.Parameter(torch.full((1,), a.gate_init))
    def forward(s, x, pos, mask, use_rope=True, bias=None, gated=False):
        B, T, _ = x.shape
        h = s.n1(x)
        q = s.q(h).view(B, T, NH, HD).transpose(1, 2)
        k = s.k(h).view(B, T, KV, HD).transpose(1, 2)
        v = s.v(h).view(B, T, KV, HD).transpose(1, 2)
        if a.qk_norm: q, k = s.qn(q), s.kn(k)
        if use_rope: q, k = rope(q, pos), rope(k, pos)
        k = k.repeat_interleave(NH // KV, 1); v = v.repeat_interleave(NH // KV, 1)
        att = (q @ k.transpose(-1, -2)) * (a.attn_scale / math.sqrt(HD)) + mask
        if bias is not None: att = att + bias
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H)
        ga, gf = (s.ga.tanh(), s.gf.tanh()) if gated else (1.0, 1.0)
        x = x + ga * s.o(y)
        h = s.n2(x)
        return x + gf * s.d(F.silu(s.g(h)) * s.u(h))

class Model(nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(len(words), H)
        s.proj = nn.Sequential(nn.Linear(a.feat, H), nn.GELU(), nn.Linear(H, H))
        s.layers = nn.ModuleList([Layer() for _ in range(a.layers)])
        s.mixer = nn.ModuleList([Layer() for _ in range(a.mixer)])
        s.norm = RMS(H)
        s.probe = nn.Linear(H, 4)
        cx = torch.tensor([at(k % G) for k in range(G*G)]); cy = torch.tensor([at(k // G) for k in range(G*G)])
        s.register_buffer("d2", (cx[:, None] - cx[None]) ** 2 + (cy[:, None] - cy[None]) ** 2)
        s.slope = nn.Parameter(torch.tensor([-1.0, -1.0, 1.0, 1.0]) * a.distance_bias)
    def forward(s, feats, pre, post):  # feats (B, 64, F); pre/post (B, Tp)/(B, Tq) ids
        occ = feats[:, :, a.feat]; s.labels = (occ, feats[:, :, a.feat + 1:]); feats = feats[:, :, :a.feat]
        img = s.proj(feats)
        bias = s.slope[:, None, None] * s.d2 if a.distance_bias else None
        selfmask = torch.diag(torch.full((G*G,), float("-inf"))).nan_to_num(0.0, neginf=float("-inf")) if a.no_self else 0.0
        mmask = selfmask
        if a.occupied_keys: mmask = mmask + torch.where(occ > 0, 0.0, float("-inf"))[:, None, None, :]
        base = img.detach() if a.aux_detach else img
        mixed = base
        for l in s.mixer: mixed = l(mixed, None, mmask, use_rope=False, bias=bias, gated=a.gated_mixer)
        if a.aux_detach: s.mixed = mixed - base; img = img + s.mixed
        else: s.mixed = img = mixed
        x = torch.cat([s.emb(pre), img, s.emb(post)], 1)
        npre, nimg, npost = pre.shape[1], img.shape[1], post.shape[1]
        pos = torch.cat([torch.arange(npre), torch.full((nimg,), npre), npre + 1 + torch.arange(npost)])
        T = x.shape[1]
        mask = torch.full((T, T), float("-inf")).triu(1)
        if a.image_mask == "bidirectional": mask[npre:npre + nimg, npre:npre + nimg] = 0.0
        for l in s.layers: x = l(x, pos, mask)
        return s.norm(x) @ s.emb.weight.T

m = Model()
for n_, p_ in m.named_parameters():
    if p_.dim() == 1: continue
    nn.init.normal_(p_, 0, 1 / math.sqrt(p_.shape[1]))
    # biases: zero
for n_, p_ in m.named_parameters():
    if n_.endswith("bias"): nn.init.zeros_(p_)
decay = [p_ for n_, p_ in m.named_parameters() if p_.dim() > 1]
nodecay = [p_ for n_, p_ in m.named_parameters() if p_.dim() <= 1]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": nodecay, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
def lr_at(step):
    if step < 50: return a.lr * (step + 1) / 50
    t = (step - 50) / max(1, a.steps - 50)
    return 5e-5 + (a.lr - 5e-5) * 0.5 * (1 + math.cos(math.pi * t))

trainF = [features(o) for o in train]; heldF = [features(o) for o in held]

def batch(scenes, F_, idx_pairs, task):
    fs, pres, posts, answers = [], [], [], []
    for i, c in idx_pairs:
        pre, post, ans = example(scenes[i], c, task)
        fs.append(F_[i]); pres.append(pre); posts.append(post + ans[:-1]); answers.append(ans)
    L = max(len(p_) for p_ in posts)
    posts = [[V["<pad>"]] * (L - len(p_)) + p_ for p_ in posts]  # left-pad inside the question
    return torch.stack(fs), torch.tensor(pres), torch.tensor(posts), torch.tensor(answers)

def evaluate():
    m.eval(); out = []
    with torch.no_grad():
        tasks = {"mix": ["shape", "closest", "furthest"],
                 "mix-colour": ["shape", "closest", "furthest", "closest-colour", "furthest-colour"]}
        for task in tasks.get(a.task, [a.task]):
            right = 0; n = 0
            pairs = [(i, c) for i in range(len(held)) for c in range(N)]
            for s in range(0, len(pairs), 64):
                f, pre, post, ans = batch(held, heldF, pairs[s:s+64], task)
                logits = m(f, pre, post)
                pred = logits[:, -2].argmax(-1)
                right += (pred == ans[:, 0]).sum().item(); n += len(pred)
            out.append(f"{task} {right / n * 100:.1f}%")
    m.train(); return " ".join(out)

t0 = time.time()
for step in range(a.steps):
    for g in opt.param_groups: g["lr"] = lr_at(step)
    imgs = [random.randrange(len(train)) for _ in range(a.batch // 4)]
    pairs = [(i, random.randrange(N)) for i in imgs for _ in range(4)]
    if not a.task.startswith("mix"): task = a.task
    elif step < a.shape_steps: task = "shape"
    elif a.task == "mix": task = random.choice(["shape", "closest", "furthest"])
    elif step < a.shape_steps + a.colour_steps: task = random.choice(["shape", "closest-colour", "furthest-colour"])
    else: task = random.choice(["shape", "closest", "furthest", "closest-colour", "furthest-colour"])
    f, pre, post, ans = batch(train, trainF, pairs, task)
    logits = m(f, pre, post)
    loss = F.cross_entropy(logits[:, -2:].reshape(-1, logits.shape[-1]), ans.reshape(-1))
    if a.aux_nearest:
        occ, lab = m.labels; keep = occ > 0
        out = m.probe(m.mixed)[keep]; lab = lab[keep].long()
        loss = loss + a.aux_nearest * (F.cross_entropy(out[:, :2], lab[:, 0]) + F.cross_entropy(out[:, 2:], lab[:, 1]))
        probe_acc = ((out[:, :2].argmax(-1) == lab[:, 0]).float().mean().item(), (out[:, 2:].argmax(-1) == lab[:, 1]).float().mean().item())
    opt.zero_grad(); loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    if (step + 1) % a.eval_every == 0:
        extra = f" probe near/far {probe_acc[0]*100:.0f}/{probe_acc[1]*100:.0f}% gates {[round(l.ga.item(), 3) for l in m.mixer]}" if a.aux_nearest else ""
        print(f"step {step+1} loss {loss.item():.3f} |g| {gn:.2f} held-out {evaluate()}{extra} ({time.time()-t0:.0f}s)", flush=True)
