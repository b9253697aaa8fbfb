"""Why the mini MLLM does not judge: its language model's size against yes/no and pick accuracy, and a probe.

    python scripts/judge_sweep.py --clip CLIP --data DATA --out runs/sweep [--size 128x4 --size 256x4 ...]
        [--steps 1200] [--batch-size 32] [--tasks describe,judge,pick] [--judge-per-image 4] [--json]
    python scripts/judge_sweep.py --clip CLIP --data DATA --mllm DIR [--mllm DIR ...]   (evaluate only)

For each ``--size`` HIDDENxLAYERS a mini MLLM is built on the CLIP's vision tower (``genret train mllm``'s
``pretrain_mllm``) and trained for the same number of steps on the same mixture (resumable: a size whose folder is
finished is only evaluated, one cut short goes on). Each model is then measured on ``--split`` (val by default: the
size to remake at is a recipe choice; the world's val split has twins since its version 4), through the
stages' own scoring paths (:func:`genret.mllm.scoring.pointwise_scores`'s prompt and answer position,
:func:`~genret.mllm.scoring.listwise_scores`):

- ``judge acc``: the yes/no answer (log P(yes) > log P(no)) on held-out pairs, both directions, half of them matching;
  ``easy`` pairs a caption with a random other image, ``twin`` with the image's twin (colours or places swapped);
- ``twin margin``: the log-odds for the right image minus that for its twin (mean ± std; > 0 prefers the right one)
  and how often it is > 0;
- ``pick``: how often the right image is picked among 4 numbered ones (itself, its twin, 2 random), and the right
  caption among 4 for an image;
- ``probe``: a logistic probe of the answer position's hidden state (last layer and the middle one), fitted on
  training-split judge rows and scored on the held-out pairs: does the model compute the match and not say it
  (probe high, judge low), or not compute it (both at chance)? The easy/twin probe is fitted on random non-matches;
  the ``twin probe`` on training images against their twins (drawn anew, never a held-out scene), scored on the
  held-out right and twin pairs: a direction for binding that random non-matches would not reveal.
- the held-out caption loss with the right image and with a shuffled one (how much the model looks).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from genret.data import load_dataset, load_image
from genret.data.annotations import signatures
from genret.eval.evaluator import twin_pairs
from genret.mllm import MLLM, scoring
from genret.prompts import load_prompt
from genret.training.mini_mllm import MiniMLLMConfig
from genret.training.pretrain_mllm import PretrainConfig, caption_loss, pretrain_mllm


def _size(text: str) -> tuple[int, int]:
    try:
        hidden, layers = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size {text!r}: expected HIDDENxLAYERS, e.g. 256x4") from None
    return hidden, layers


def held_out_pairs(test, rng: random.Random) -> list[dict]:
    """Judge pairs on a held-out split: per twin pair, each direction, the right item, its twin's and a random one."""
    by_id = {r.id: i for i, r in enumerate(test.records)}
    out = []
    for a, b in twin_pairs(test):
        for i, j in ((by_id[a], by_id[b]), (by_id[b], by_id[a])):
            other = rng.choice([k for k in range(len(test.records)) if k not in (i, j)])
            text = rng.choice(test.records[i].captions)
            out += [{"dir": "t2i", "text": text, "image": i, "yes": True, "kind": "right", "twin": j},
                    {"dir": "t2i", "text": text, "image": j, "yes": False, "kind": "twin"},
                    {"dir": "t2i", "text": text, "image": other, "yes": False, "kind": "easy"},
                    {"dir": "i2t", "text": rng.choice(test.records[j].captions), "image": i, "yes": False,
                     "kind": "twin"},
                    {"dir": "i2t", "text": rng.choice(test.records[other].captions), "image": i, "yes": False,
                     "kind": "easy"},
                    {"dir": "i2t", "text": rng.choice(test.records[i].captions), "image": i, "yes": True,
                     "kind": "right"}]
    return out


def train_pairs(train, rng: random.Random, n: int) -> list[dict]:
    """Judge pairs on the training split for the probe: half matching, half a random image's or its caption."""
    out = []
    for _ in range(n):
        i = rng.randrange(len(train.records))
        j = rng.choice([k for k in range(len(train.records)) if k != i])
        yes, d = rng.random() < 0.5, rng.choice(("t2i", "i2t"))
        text = rng.choice(train.records[i].captions)
        out.append({"dir": d, "text": text, "image": i if yes else j, "yes": yes})
    return out


def twin_train_pairs(train, rng: random.Random, n: int, avoid: frozenset, size: int) -> list[dict]:
    """Judge pairs on the training split for the twin probe: half matching, half the image against its twin (drawn
    anew by the annotation plug-in, never a held-out scene): t2i the twin's picture for the caption, i2t a caption
    of the twin for the image. A probe fitted on these asks whether the answer position *holds* binding and place
    (a probe fitted on random non-matches need not find that direction even where it is there)."""
    from genret.data.annotations import annotation_of, eligible_twins

    have = [i for i, r in enumerate(train.records) if eligible_twins(annotation_of(r.meta), avoid)]
    out = []
    for _ in range(n):
        i = rng.choice(have)
        found = annotation_of(train.records[i].meta)
        kind, (_, twin) = found[1], rng.choice(eligible_twins(found, avoid))
        yes, d = rng.random() < 0.5, rng.choice(("t2i", "i2t"))
        text = rng.choice(train.records[i].captions)
        if d == "t2i":
            row = {"dir": d, "text": text, "image": i, "yes": yes}
            if not yes:
                row["picture"] = kind.render(twin, size, rng.getrandbits(32))
        else:
            row = {"dir": d, "text": text if yes else kind.captions(twin, rng, 1)[0], "image": i, "yes": yes}
        out.append(row)
    return out


def _picture(p: dict, records):
    return p["picture"] if "picture" in p else load_image(records[p["image"]].path)


@torch.no_grad()
def judge_states(mllm: MLLM, pairs: list[dict], records, layers: list[int], batch_size: int = 32):
    """The yes/no log-odds at the answer position (as :func:`scoring.pointwise_scores` reads it) and that position's
    hidden states at ``layers``, for each pair."""
    prompt = load_prompt("rerank_pointwise")
    yes, no = prompt.settings.get("yes", "yes"), prompt.settings.get("no", "no")
    margins, states = [], {layer: [] for layer in layers}
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        texts = [scoring.render(mllm, scoring.pointwise_messages(prompt.section(p["dir"])["user"], p["text"]))
                 for p in chunk]
        yes_ids, no_ids = scoring.yes_no_ids(mllm, texts[0], yes, no)
        inputs = scoring._inputs(mllm, texts, [[_picture(p, records)] for p in chunk])
        out = mllm.model(**inputs, output_hidden_states=True)
        last = inputs["attention_mask"].sum(dim=1) - 1
        rows = torch.arange(len(chunk))
        margins += scoring.yes_no_score(out.logits[rows, last], yes_ids, no_ids).tolist()
        for layer in layers:
            states[layer].append(out.hidden_states[layer][rows, last].float().cpu().numpy())
    return np.array(margins), {layer: np.concatenate(v) for layer, v in states.items()}


def pick_accuracy(mllm: MLLM, test, rng: random.Random, n: int) -> dict[str, float]:
    """How often the listwise stage's scores put the right one first among 4 (itself, its twin, 2 random)."""
    prompt = load_prompt("rerank_listwise")
    by_id = {r.id: i for i, r in enumerate(test.records)}
    pairs = [(by_id[a], by_id[b]) for a, b in twin_pairs(test)][:n]
    hits = {"t2i": [], "i2t": []}
    for i, j in pairs:
        rest = rng.sample([k for k in range(len(test.records)) if k not in (i, j)], 2)
        cands = [i, j, *rest]
        rng.shuffle(cands)
        section = prompt.section("t2i")
        scores = scoring.listwise_scores(mllm, section["user"], section["item"],
                                         {"text": rng.choice(test.records[i].captions)},
                                         [load_image(test.records[c].path) for c in cands], "image")
        hits["t2i"].append(cands[int(np.argmax(scores))] == i)
        section = prompt.section("i2t")
        scores = scoring.listwise_scores(mllm, section["user"], section["item"],
                                         {"image": load_image(test.records[i].path)},
                                         [rng.choice(test.records[c].captions) for c in cands], "text")
        hits["i2t"].append(cands[int(np.argmax(scores))] == i)
    return {d: round(100 * float(np.mean(h)), 1) for d, h in hits.items()}


@torch.no_grad()
def generative_twins(mllm: MLLM, pairs: list[dict], records) -> dict[str, float]:
    """How often the generative stage's score (log P(caption | image)) puts the right one above its twin: per t2i
    caption its image against the twin image, per i2t image its caption against the twin's."""
    prompt = load_prompt("rerank_generative")
    out = {}
    for d in ("t2i", "i2t"):
        right = [p for p in pairs if p["dir"] == d and p["kind"] == "right"]
        twin = [p for p in pairs if p["dir"] == d and p["kind"] == "twin"]
        scores = [scoring.generative_scores(mllm, prompt.section(d)["user"], [p["text"] for p in rows],
                                            [load_image(records[p["image"]].path) for p in rows])
                  for rows in (right, twin)]
        out[d] = round(100 * float(np.mean(np.array(scores[0]) > np.array(scores[1]))), 1)
    return out


def probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Held-out accuracy (%) of a logistic probe on standardised states."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    clf = LogisticRegression(max_iter=3000, C=0.1).fit((x_train - mu) / sd, y_train)
    return round(100 * clf.score((x_test - mu) / sd, y_test), 1)


def evaluate(folder: str, data, probe_rows: int, pick_sets: int, seed: int, split: str = "val") -> dict:
    """Every measure of the module docstring for the mini MLLM at ``folder``, on the held-out ``split``."""
    mllm = MLLM.load(str(folder))
    mllm.model.eval()
    train, test = data.split("train"), data.split(split)
    if not twin_pairs(test):
        raise SystemExit(f"--split {split}: the data set has no twin pairs in it; remake the world "
                         "(genret data synth) or name a split with twins")
    n_layers = mllm.model.config.text_config.num_hidden_layers
    layers = sorted({n_layers // 2, n_layers})
    rng = random.Random(seed)
    held = held_out_pairs(test, rng)
    margins, states = judge_states(mllm, held, test.records, layers)
    fit = train_pairs(train, rng, probe_rows)
    _, fit_states = judge_states(mllm, fit, train.records, layers)
    y_fit = np.array([p["yes"] for p in fit])
    avoid = signatures(data.split("val", "test").records)
    twin_fit = twin_train_pairs(train, rng, probe_rows, avoid, load_image(train.records[0].path).size[0])
    _, twin_states = judge_states(mllm, twin_fit, train.records, layers)
    y_twin = np.array([p["yes"] for p in twin_fit])
    kind = np.array([p["kind"] for p in held])
    said = margins > 0
    truth = np.array([p["yes"] for p in held])
    out: dict = {"model": str(folder), "parameters": sum(p.numel() for n, p in mllm.model.named_parameters()
                                                          if "language_model" in n or "lm_head" in n)}
    direction = np.array([p["dir"] for p in held])
    for name, sel in (("easy", kind != "twin"), ("twin", kind != "easy")):
        out[f"judge_{name}"] = round(100 * float((said[sel] == truth[sel]).mean()), 1)
        for d in ("t2i", "i2t"):
            part = sel & (direction == d)
            out[f"judge_{name}_{d}"] = round(100 * float((said[part] == truth[part]).mean()), 1)
        for layer in layers:
            out[f"probe_{name}_L{layer}"] = probe(fit_states[layer], y_fit, states[layer][sel], truth[sel])
    for layer in layers:  # fitted on training twins: is binding and place held at the answer position at all?
        sel = kind != "easy"
        out[f"twin_probe_L{layer}"] = probe(twin_states[layer], y_twin, states[layer][sel], truth[sel])
    # twin margin: per t2i caption, log-odds(right image) - log-odds(twin image); per i2t image, right - twin caption
    right = [k for k, p in enumerate(held) if p["kind"] == "right"]
    twin = [k for k, p in enumerate(held) if p["kind"] == "twin"]
    diff = margins[right] - margins[twin]
    out["twin_margin"] = f"{diff.mean():+.3f} ± {diff.std():.3f}"
    out["twin_right"] = round(100 * float((diff > 0).mean()), 1)
    out["generative_twin"] = generative_twins(mllm, held, test.records)
    out["pick"] = pick_accuracy(mllm, test, rng, pick_sets)
    out["caption_loss"] = caption_loss(mllm.model, mllm.processor, mllm.family, test)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/judge-sweep")
    parser.add_argument("--size", action="append", type=_size, default=[],
                        help="HIDDENxLAYERS of a language model to train (repeatable)")
    parser.add_argument("--mllm", action="append", default=[], help="a trained mini MLLM to evaluate as it is")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tasks", default="describe,judge,pick")
    parser.add_argument("--judge-per-image", type=int, default=4)
    parser.add_argument("--pick-per-image", type=int, default=1)
    parser.add_argument("--random-negatives", type=float, default=0.3)
    parser.add_argument("--twin-negatives", type=float, default=0.0)
    parser.add_argument("--loss-average", default="example")
    parser.add_argument("--augment-rotation", type=float, default=20.0)
    parser.add_argument("--probe-rows", type=int, default=1500)
    parser.add_argument("--pick-sets", type=int, default=100)
    parser.add_argument("--split", default="val", help="held-out split to measure on (val: choose on it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    folders = list(args.mllm)
    for hidden, layers in args.size:
        folder = Path(args.out) / f"h{hidden}-l{layers}"
        folders.append(str(folder))
        if (folder / "genret.json").is_file():
            continue
        config = PretrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, tasks=args.tasks,
                                judge_per_image=args.judge_per_image, pick_per_image=args.pick_per_image,
                                random_negatives=args.random_negatives, twin_negatives=args.twin_negatives,
                                loss_average=args.loss_average,
                                augment_rotation=args.augment_rotation, save_every=200, log_every=50,
                                seed=args.seed, threads=args.threads)
        arch = MiniMLLMConfig(hidden_size=hidden, layers=layers, heads=max(4, hidden // 64),
                              intermediate_size=4 * hidden)
        resume = any(folder.glob("checkpoints/*/trainer_state.json"))
        pretrain_mllm(args.clip, data.split("train"), folder, config, arch, resume=resume,
                      held_out=data.split("val", "test"))
    rows = [evaluate(f, data, args.probe_rows, args.pick_sets, args.seed, args.split) for f in folders]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| model | LM params | judge easy / twin (t2i; i2t) | twin margin (right − twin) | twin right | pick t2i / i2t | "
          "probe easy / twin (mid, last) | twin probe, fitted on twins (mid, last) | generative twins t2i / i2t | "
          "caption loss image / shuffled |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        at = sorted(int(k.rsplit("L", 1)[1]) for k in r if k.startswith("probe_easy_L"))
        mid, last = at[0], at[-1]
        print(f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['judge_easy']} / {r['judge_twin']} "
              f"({r['judge_easy_t2i']} / {r['judge_twin_t2i']}; {r['judge_easy_i2t']} / {r['judge_twin_i2t']}) | "
              f"{r['twin_margin']} | {r['twin_right']} | {r['pick']['t2i']} / {r['pick']['i2t']} | "
              f"{r[f'probe_easy_L{mid}']}, {r[f'probe_easy_L{last}']} / {r[f'probe_twin_L{mid}']}, "
              f"{r[f'probe_twin_L{last}']} | {r[f'twin_probe_L{mid}']}, {r[f'twin_probe_L{last}']} | "
              f"{r['generative_twin']['t2i']} / {r['generative_twin']['i2t']} | "
              f"{r['caption_loss']['with_image']} / {r['caption_loss']['shuffled_image']} |")


if __name__ == "__main__":
    main()
