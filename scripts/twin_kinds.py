"""Which twins each scorer tells apart: the miniature world's binding twins (colours swapped between the two
objects) and relation twins (places swapped) apart.

    python scripts/twin_kinds.py --clip CLIP --mllm MLLM [--mllm MLLM ...] --data DATA [--split val]
        [--positions] [--places] [--attention] [--json]

For each twin pair of the split (``twin_of``), in both directions: t2i, one caption of an image against the image
and its twin; i2t, the image against its caption and one of the twin's. Scored by the CLIP (cosine), and for each
MLLM by the generative stage's score (log P(caption | image)) and the pointwise stage's (log P(yes) − log P(no)),
each through the stage's own prompt. The table gives how often the right one scores higher, per twin kind.

Why: a binding twin differs where a caption's words sit next to each other ("red circle"), which a captioner reads
off the object it looks at; a relation twin differs in where the objects are, which a language model with 1-D
positions must read from the patch tokens' content. The split says which the rerankers lack.

``--positions``: where each image token is, read back by a linear probe from the token alone (its column, and its
row, of the patch grid; fitted on 200 images' tokens, scored on 100 others) at each vision-tower layer and after the
projector (the tokens the language model reads), and at each language-model layer (the image tokens' own states there,
under the generative prompt): how much of the place a token holds reaches the language model and stays.

``--places``: the pretraining's own question, "Where is the X?", for both objects of every image of the split, by
log P(answer | image, question): the true place against the inverse one (which object is where), and the true
axis's answers against the other axis's (the layout).

``--attention`` (LLaVA): where the answer position looks when asked about one object — each layer's and head's
attention on the patch under the asked object and under the other one.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch

from genret.data import load_dataset, load_image
from genret.encoders.hf import HFDualEncoder
from genret.eval.evaluator import twin_pairs
from genret.mllm import MLLM, scoring
from genret.prompts import load_prompt
from genret.training.negatives import embed_as
from genret.world.scene import Scene


def kind_of(a: Scene, b: Scene) -> str:
    """``binding`` or ``relation``: which of ``a``'s twins ``b`` is."""
    if b.signature() == a.binding_twin().signature():
        return "binding"
    if b.signature() == a.relation_twin().signature():
        return "relation"
    raise ValueError(f"{b} is not a twin of {a}")


def rows(data, rng: random.Random) -> list[dict]:
    """Per twin pair and direction, the query and its right and twin candidates."""
    by_id = {r.id: r for r in data.records}
    out = []
    for x, y in twin_pairs(data):
        for a, b in ((by_id[x], by_id[y]), (by_id[y], by_id[x])):
            kind = kind_of(Scene.from_dict(a.meta["scene"]), Scene.from_dict(b.meta["scene"]))
            text = rng.choice(a.captions)
            out.append({"dir": "t2i", "kind": kind, "text": text, "right": str(a.path), "twin": str(b.path)})
            out.append({"dir": "i2t", "kind": kind, "image": str(a.path), "right": text,
                        "twin": rng.choice(b.captions)})
    return out


def clip_right(clip: HFDualEncoder, cases: list[dict]) -> np.ndarray:
    """Per case, whether the CLIP's cosine puts the right one above the twin (each text and image embedded once)."""
    def unit(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    texts = sorted({c[k] for c in cases for k in (("text",) if c["dir"] == "t2i" else ("right", "twin"))})
    images = sorted({c[k] for c in cases for k in (("right", "twin") if c["dir"] == "t2i" else ("image",))})
    t_vec = dict(zip(texts, unit(embed_as(clip, "text", texts, ("query",))["query"])))
    i_vec = dict(zip(images, unit(embed_as(clip, "image", images, ("query",))["query"])))
    out = []
    for c in cases:
        if c["dir"] == "t2i":
            q, right, twin = t_vec[c["text"]], i_vec[c["right"]], i_vec[c["twin"]]
        else:
            q, right, twin = i_vec[c["image"]], t_vec[c["right"]], t_vec[c["twin"]]
        out.append(float(q @ right) > float(q @ twin))
    return np.array(out)


@torch.no_grad()
def mllm_right(mllm: MLLM, cases: list[dict]) -> dict[str, np.ndarray]:
    generative, pointwise = load_prompt("rerank_generative"), load_prompt("rerank_pointwise")
    yes, no = pointwise.settings.get("yes", "yes"), pointwise.settings.get("no", "no")
    gen, judge = [], []
    for c in cases:
        d = c["dir"]
        if d == "t2i":
            texts, images = [c["text"]] * 2, [load_image(c["right"]), load_image(c["twin"])]
        else:
            texts, images = [c["right"], c["twin"]], [load_image(c["image"])] * 2
        g = scoring.generative_scores(mllm, generative.section(d)["user"], texts, images)
        gen.append(g[0] > g[1])
        p = scoring.pointwise_scores(mllm, pointwise.section(d)["user"], texts, images, yes=yes, no=no)
        judge.append(p[0] > p[1])
    return {"generative": np.array(gen), "pointwise": np.array(judge)}


@torch.no_grad()
def place_answers(mllm: MLLM, data) -> dict[str, float]:
    """Asked "Where is the X?" (the pretraining's answer task), scored by log P(answer | image, question): how often
    the MLLM prefers the true place to the inverse one, per axis (which object is where), and how often it puts the
    true axis's two answers above the other axis's (the layout: side by side or stacked)."""
    from genret.world.scene import Scene

    right = {"left / right": [], "above / below": [], "axis": []}
    for r in data.records:
        scene = Scene.from_dict(r.meta["scene"])
        axis = "left / right" if scene.relation in ("left of", "right of") else "above / below"
        image = load_image(r.path)
        for question, true, inverse, across in place_questions(scene):
            g = scoring.generative_scores(mllm, "{image}\n" + question, [true, inverse, *across], [image] * 4)
            right[axis].append(g[0] > g[1])
            right["axis"].append(max(g[:2]) > max(g[2:]))
    return {k: round(100 * float(np.mean(v)), 1) for k, v in right.items() if v}


def place_questions(scene) -> list[tuple[str, str, str, tuple[str, str]]]:
    """Per object of ``scene``: "Where is the X?", its true place (the pretraining's answer), the inverse one, and the
    two places of the other axis."""
    from genret.world.scene import INVERSE

    (a, b), rel = scene.objects, scene.relation
    cross = ("above", "below") if rel in ("left of", "right of") else ("left of", "right of")
    return [(f"Where is the {obj.noun()}?", f"{place} the {other.noun()}", f"{INVERSE[place]} the {other.noun()}",
             tuple(f"{c} the {other.noun()}" for c in cross))
            for obj, other, place in ((a, b, rel), (b, a, INVERSE[rel]))]


@torch.no_grad()
def object_attention(mllm: MLLM, data, limit: int = 60) -> dict[str, list[dict[str, float]]]:
    """Where the answer position looks when asked about one object: per question kind ("Where is the X?", "What colour
    is the <shape>?") and language-model layer, each head's attention from the prompt's last token to the patch under
    the asked object's centre, to the patch under the other's, and to all image tokens (means over the split's first
    ``limit`` scenes whose two shapes differ). LLaVA's raster of patch tokens only."""
    from genret.world.scene import Scene

    if getattr(getattr(mllm.model, "model", mllm.model), "vision_tower", None) is None:
        raise SystemExit("--attention reads LLaVA's raster of patch tokens; this MLLM is not a LLaVA")
    mllm.model.set_attn_implementation("eager")  # the only one that returns attention weights
    vision = mllm.model.config.vision_config
    side, patch = vision.image_size // vision.patch_size, vision.patch_size
    image_id = mllm.family.image_token_id(mllm.model)
    records = [r for r in data.records if len({o["shape"] for o in r.meta["scene"]["objects"]}) == 2][:limit]
    seen: dict[str, list[torch.Tensor]] = {"where": [], "colour": []}
    for r in records:
        scene = Scene.from_dict(r.meta["scene"])
        a, b = scene.objects
        cells = [min(int(o.y // patch), side - 1) * side + min(int(o.x // patch), side - 1) for o in (a, b)]
        for kind, question in (("where", f"Where is the {a.noun()}?"), ("colour", f"What colour is the {a.shape}?")):
            prompt = scoring.render(mllm, scoring.user_message("{image}\n" + question))
            inputs = scoring._inputs(mllm, [prompt], [[load_image(r.path)]])
            attentions = mllm.model(**{k: v.to(mllm.device) for k, v in inputs.items() if k != "labels"},
                                    output_attentions=True).attentions
            at = (inputs["input_ids"][0] == image_id).nonzero().flatten()
            on_image = [w[0, :, -1, at].float().cpu() for w in attentions]  # per layer: heads x image tokens
            seen[kind].append(torch.stack([torch.stack([w[:, cells[0]], w[:, cells[1]], w.sum(-1)], -1)
                                           for w in on_image]))  # layers x heads x 3
    table = {}
    for kind, rows in seen.items():
        mean = torch.stack(rows).mean(0)
        table[kind] = [{"layer": k + 1, "asked": [round(float(x), 4) for x in mean[k, :, 0]],
                        "other": [round(float(x), 4) for x in mean[k, :, 1]],
                        "image": [round(float(x), 3) for x in mean[k, :, 2]]} for k in range(mean.shape[0])]
    return table


@torch.no_grad()
def language_model_states(mllm: MLLM, images: list, batch: int = 50) -> list[torch.Tensor]:
    """Per language-model hidden state (the embeddings, then each layer), ``(images, tokens, hidden)`` at the image
    tokens' positions, with the generative stage's prompt ("Describe the image.") after them."""
    prompt = scoring.render(mllm, scoring.user_message(load_prompt("rerank_generative").section("t2i")["user"]))
    image_id = mllm.family.image_token_id(mllm.model)
    per_level: list[list[torch.Tensor]] = []
    for s in range(0, len(images), batch):
        shown = images[s:s + batch]
        inputs = scoring._inputs(mllm, [prompt] * len(shown), [[im] for im in shown])
        extra = mllm.family.forward_kwargs(mllm.model, inputs["input_ids"], inputs, inputs.get("attention_mask"))
        model_inputs = {k: v.to(mllm.device) for k, v in inputs.items() if k != "labels"}
        states = mllm.model(**model_inputs, **extra, output_hidden_states=True).hidden_states
        at = inputs["input_ids"] == image_id
        for k, h in enumerate(states):
            if len(per_level) <= k:
                per_level.append([])
            per_level[k].append(h[at.to(h.device)].reshape(len(shown), -1, h.shape[-1]).float().cpu())
    return [torch.cat(level) for level in per_level]


@torch.no_grad()
def position_probe(mllm: MLLM, data, n_fit: int = 200, n_test: int = 100) -> dict[str, dict[str, float]]:
    """Per vision-tower layer, after the projector and at each language-model layer (the image tokens' own states
    there), a linear probe's accuracy (%) at reading each patch token's column and row from the token alone."""
    from sklearn.linear_model import LogisticRegression

    n_fit = min(n_fit, 2 * len(data.records) // 3)
    n_test = min(n_test, len(data.records) - n_fit)
    images = [load_image(r.path) for r in data.records[:n_fit + n_test]]
    inputs = mllm.family.image_inputs(mllm.processor, images)
    feats = scoring.image_features(mllm, images)
    projected = torch.stack([mllm.family.feature_embeds(f) for f in feats]).float()
    n = projected.shape[1]
    # Qwen keeps (rows, cols, hidden) per image (Qwen3-VL a level axis first): the columns are the grid's own.
    side = int(feats[0].shape[-2]) if feats[0].dim() >= 3 else int(round(n ** 0.5))
    where = {"column": np.arange(n) % side, "row": np.arange(n) // side}
    levels = {}
    tower = getattr(getattr(mllm.model, "model", mllm.model), "vision_tower", None)
    if tower is not None:  # LLaVA: each layer of the CLIP tower (Qwen2-VL's tower gives its place by 2-D RoPE instead)
        states = tower(pixel_values=inputs["pixel_values"].to(mllm.device), output_hidden_states=True).hidden_states
        levels = {f"tower layer {k}": h[:, -n:].float() for k, h in enumerate(states) if k}
    levels["projected (the language model's input)"] = projected
    for k, h in enumerate(language_model_states(mllm, images)):
        if k:
            levels[f"language model layer {k} (at the image tokens)"] = h
    out = {}
    for name, x in levels.items():
        x = x.cpu().numpy()
        fit, test = x[:n_fit].reshape(-1, x.shape[-1]), x[n_fit:].reshape(-1, x.shape[-1])
        mu, sd = fit.mean(0), fit.std(0) + 1e-6
        out[name] = {}
        for what, y in where.items():
            clf = LogisticRegression(max_iter=2000).fit((fit - mu) / sd, np.tile(y, n_fit))
            out[name][what] = round(100 * clf.score((test - mu) / sd, np.tile(y, len(x) - n_fit)), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--mllm", action="append", default=[])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--positions", action="store_true", help="also probe where each image token is (per MLLM)")
    parser.add_argument("--attention", action="store_true", help="also measure the answer position's attention on "
                        "the asked object's and the other object's patches (LLaVA)")
    parser.add_argument("--places", action="store_true", help="also ask each MLLM where each object is (both objects "
                        "of every image of the split: the true place against the inverse one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data).split(args.split)
    cases = rows(data, random.Random(args.seed))
    if not cases:
        raise SystemExit(f"--split {args.split}: no twin pairs in it")
    scorers = {"prefilter (CLIP)": clip_right(HFDualEncoder(args.clip, device="cpu"), cases)}
    positions, places, attention = {}, {}, {}
    for folder in args.mllm:
        mllm = MLLM.load(folder)
        mllm.model.eval()
        for name, right in mllm_right(mllm, cases).items():
            scorers[f"{folder} {name}"] = right
        if args.positions:
            positions[folder] = position_probe(mllm, data)
        if args.places:
            places[folder] = place_answers(mllm, data)
        if args.attention:
            attention[folder] = object_attention(mllm, data)
    kinds = np.array([c["kind"] for c in cases])
    dirs = np.array([c["dir"] for c in cases])
    table = {}
    for name, right in scorers.items():
        table[name] = {f"{k} {d}": round(100 * float(right[(kinds == k) & (dirs == d)].mean()), 1)
                       for k in ("binding", "relation") for d in ("t2i", "i2t") if ((kinds == k) & (dirs == d)).any()}
    counts = {f"{k} {d}": int(((kinds == k) & (dirs == d)).sum()) for k in ("binding", "relation") for d in ("t2i", "i2t")}
    if args.json:
        print(json.dumps({"split": args.split, "cases": counts, "right_%": table, "positions_%": positions,
                          "places_%": places, "attention": attention}, indent=2))
        return
    cols = list(counts)
    print(f"{args.split}: how often the right one scores above its twin, % (cases: "
          + ", ".join(f"{c} {n}" for c, n in counts.items()) + ")")
    print("| scorer | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(str(row.get(c, "-")) for c in cols) + " |")
    if places:
        print("\nWhere is the X? the true place preferred to the inverse one (per axis), and the true axis to the other, %")
        print("| MLLM | left / right | above / below | axis |\n|---|---|---|---|")
        for folder, acc in places.items():
            print(f"| {folder} | {acc.get('left / right', '-')} | {acc.get('above / below', '-')} | {acc['axis']} |")
    for folder, kinds in attention.items():
        print(f"\n{folder}: the answer position's attention on the asked object's patch / the other's (each head)")
        print("| question | layer | " + " | ".join(f"head {h}" for h in range(len(kinds["where"][0]["asked"])))
              + " |\n|---|---|" + "---|" * len(kinds["where"][0]["asked"]))
        for kind, layers in kinds.items():
            for row in layers:
                print(f"| {kind} | {row['layer']} | " + " | ".join(f"{x:.3f} / {y:.3f}" for x, y in
                                                                    zip(row["asked"], row["other"])) + " |")
    for folder, levels in positions.items():
        print(f"\n{folder}: each image token's place read back from the token alone (linear probe, %)")
        print("| tokens | column | row |\n|---|---|---|")
        for name, acc in levels.items():
            print(f"| {name} | {acc['column']} | {acc['row']} |")


if __name__ == "__main__":
    main()
