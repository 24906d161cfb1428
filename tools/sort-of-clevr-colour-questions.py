"""Auxiliary Sort-of-CLEVR questions: the colour of the object closest to and
furthest from each object of every training scene, appended to the paper's
training questions (docs/benchmarks.md, "Colour questions").

The answer is a colour, so the scene's majority shape, the shortcut that
holds shape-of-closest at about two thirds, does not help. Ties go to the
first object in colour order, as `sort_of_clevr::ask` does.

    python3 tools/sort-of-clevr-colour-questions.py target/sort-of-clevr
    # writes target/sort-of-clevr/train-colour.jsonl: train.jsonl, then 12 questions per training scene
"""
import json, os, sys

d = sys.argv[1] if len(sys.argv) > 1 else "target/sort-of-clevr"
out_path = os.path.join(d, "train-colour.jsonl")
tmp = out_path + ".tmp"
n = 0
with open(tmp, "w") as out:
    with open(os.path.join(d, "train.jsonl")) as f:
        for line in f:
            out.write(line)
    with open(os.path.join(d, "scenes.jsonl")) as f:
        for line in f:
            s = json.loads(line)
            if s["split"] != "train":
                continue
            for me in s["objects"]:
                others = [o for o in s["objects"] if o["color"] != me["color"]]
                dist = lambda o: (o["x"] - me["x"]) ** 2 + (o["y"] - me["y"]) ** 2
                near = min(others, key=dist)
                far = others[0]
                for o in others[1:]:
                    if dist(o) > dist(far):
                        far = o
                for kind, o, link in (("closest-color", near, "closest to"), ("furthest-color", far, "furthest from")):
                    row = {"image": s["image"], "question": f"What is the color of the object {link} the {me['color']} object?",
                           "answer": o["color"], "relational": True, "type": kind, "color": me["color"]}
                    out.write(json.dumps(row, separators=(",", ":")) + "\n")
                    n += 1
    out.flush()
    os.fsync(out.fileno())
os.replace(tmp, out_path)
print(f"{out_path}: {n} colour questions after the training questions")
