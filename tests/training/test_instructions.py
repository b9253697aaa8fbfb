"""The instruction mixture: every stage's task, in the stage's own prompt, with true answers."""

import random
import re

import pytest

from genret.training.instructions import TASKS, as_messages
from genret.training.pretrain_mllm import PretrainConfig, encode_example, mixture
from genret.world.answerers import SCRIPT


@pytest.fixture(scope="module")
def epoch(world, clip_dir):
    train = world.split("train")
    mix = mixture(train, clip_dir, PretrainConfig())
    return train, mix.epoch(random.Random(0))


def _text(example):
    return "".join(p.get("text", "<image>") for m in as_messages(example.messages) for p in m["content"])


def test_every_task_is_drawn_with_its_images(epoch):
    train, examples = epoch
    assert {e.task for e in examples} == set(TASKS)
    assert sum(e.task == "describe" for e in examples) == sum(len(r.captions) for r in train.records)
    for e in examples:
        assert _text(e).count("<image>") == len(e.images), e
        assert (len(e.images) == 0) == (e.task in ("rewrite", "ask"))


def test_judge_and_pick_answers_are_true(epoch):
    train, examples = epoch
    owner = {c: i for i, r in enumerate(train.records) for c in r.captions}
    judged = [e for e in examples if e.task == "judge"]
    assert {e.answer for e in judged} == {"yes", "no"}
    for e in judged:
        text = re.search(r"Text: (.*)\n", _text(e)).group(1)
        assert (e.answer == "yes") == (train.records[e.images[0]].captions.count(text) > 0), e
    for e in (e for e in examples if e.task == "pick"):
        body = _text(e)
        if body.startswith("Text: "):  # t2i: the numbered images; the answer names the caption's image
            text = body.split("\n", 1)[0][len("Text: "):]
            assert e.images[int(e.answer) - 1] == owner[text], e
        else:  # i2t: the image first, then numbered captions
            lines = dict(re.findall(r"Text (\d+): (.*)\n", body))
            assert owner[lines[e.answer]] == e.images[0] and len(lines) == 4, e


def test_rewrite_and_ask_are_text_only_and_true(epoch):
    _, examples = epoch
    asks = [e for e in examples if e.task == "ask"]
    assert asks and all(e.answer in SCRIPT and "What we know so far" in _text(e) for e in asks)
    rewrites = [e for e in examples if e.task == "rewrite"]
    assert rewrites and all("Instruction: " in _text(e) and e.answer for e in rewrites)


def test_the_prompts_render_as_the_stages_render_them(epoch, mllm_dir):
    from genret.mllm import MLLM, scoring
    from genret.prompts import load_prompt

    _, examples = epoch
    mllm = MLLM.load(str(mllm_dir))
    e = next(e for e in examples if e.task == "judge" and _text(e).startswith("Text: "))
    text = re.search(r"Text: (.*)\n", _text(e)).group(1)
    stage = scoring.render(mllm, scoring.user_message(load_prompt("rerank_pointwise").section("t2i")["user"], text=text))
    assert mllm.processor.apply_chat_template(as_messages(e.messages), add_generation_prompt=True) == stage
    ids, start = encode_example(mllm.processor, mllm.family, 7, e)
    assert ids[:start].count(mllm.processor.tokenizer.convert_tokens_to_ids("<image>")) == 7


def test_tasks_are_checked():
    with pytest.raises(ValueError, match="tasks must be a comma-separated list of describe"):
        PretrainConfig(tasks="describe,dance")
    assert PretrainConfig(tasks="describe, judge", judge_per_image=0).counts() == {"describe": 1}


def test_random_negatives_stand_in_for_near_misses_and_stay_false(world, clip_dir):
    train = world.split("train")
    runs = {share: mixture(train, clip_dir, PretrainConfig(random_negatives=share)) for share in (0.0, 1.0)}
    owner = {c: i for i, r in enumerate(train.records) for c in r.captions}
    near = {}
    for share, mix in runs.items():
        examples, hits = mix.epoch(random.Random(0)), []
        for e in (e for e in examples if e.task == "judge"):  # every judge is true, its no mined or random
            text = re.search(r"Text: (.*)\n", _text(e)).group(1)
            assert (e.answer == "yes") == (text in train.records[e.images[0]].captions), e
            if e.answer == "no" and _text(e).startswith("Text: "):  # t2i: is the image one the prefilter mined?
                group = mix.by_query[("t2i", mix.texts.index(text))]
                hits.append(e.images[0] in group.negatives[:mix.candidates])
        for e in (e for e in examples if e.task == "pick" and _text(e).startswith("Text: ")):
            assert len(set(e.images)) == len(e.images) and e.images[int(e.answer) - 1] == owner[
                _text(e).split("\n", 1)[0][len("Text: "):]], e
        near[share] = sum(hits) / len(hits)
    assert near[0.0] == 1.0 and near[1.0] < 0.2, near
    with pytest.raises(ValueError, match="random_negatives must be a share in \\[0, 1\\], got 2"):
        PretrainConfig(random_negatives=2)


def test_judge_and_pick_rows_score_as_the_stages_score_them(epoch, mllm_dir):
    """The pretraining rows as the model sees them (rendered prompt, label position, attention mask, images) give
    the numbers the stages read: a judge row's label is the first answer token the pointwise stage reads, at the
    position it reads it, and a pick row's answer log-probability is the listwise stage's score of that number."""
    import torch

    from genret.data import load_image
    from genret.mllm import MLLM, scoring
    from genret.prompts import load_prompt
    from genret.training.pretrain_mllm import _batch

    train, examples = epoch
    mllm = MLLM.load(str(mllm_dir))
    proc, n_tokens = mllm.processor, mllm.model.config.image_seq_length

    def row_logprobs(e):  # log-probabilities at every answer position of the training row
        ids, start = encode_example(proc, mllm.family, n_tokens, e)
        batch = _batch([(ids, start)], proc.tokenizer.pad_token_id)
        pixels = proc.image_processor(images=[load_image(train.records[i].path) for i in e.images],
                                      return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = mllm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                pixel_values=pixels).logits[0].float().log_softmax(-1)
        assert (batch["labels"][0, :start] == -100).all() and batch["labels"][0, start:].tolist() == ids[start:]
        return logits, ids, start

    pointwise, listwise = load_prompt("rerank_pointwise"), load_prompt("rerank_listwise")
    for direction in ("t2i", "i2t"):
        for answer in ("yes", "no"):
            e = next(e for e in examples if e.task == "judge" and e.answer == answer
                     and _text(e).startswith("Text: ") == (direction == "t2i"))
            text = re.search(r"Text: (.*)\n", _text(e)).group(1)
            template = pointwise.section(direction)["user"]
            logits, ids, start = row_logprobs(e)
            yes_ids, no_ids = scoring.yes_no_ids(mllm, scoring.render(mllm, scoring.pointwise_messages(template, text)),
                                                 "yes", "no")
            assert ids[start] in (yes_ids if answer == "yes" else no_ids), (e, ids[start:])
            trained = scoring.yes_no_score(logits[start - 1], yes_ids, no_ids).item()
            stage = scoring.pointwise_scores(mllm, template, [text], [load_image(train.records[e.images[0]].path)])
            assert abs(trained - stage[0]) < 1e-4, (direction, answer, trained, stage)
    for direction in ("t2i", "i2t"):
        e = next(e for e in examples if e.task == "pick" and _text(e).startswith("Text: ") == (direction == "t2i"))
        logits, ids, start = row_logprobs(e)
        trained = sum(logits[j - 1, ids[j]].item() for j in range(start, len(ids)))
        section = listwise.section(direction)
        body = _text(e)
        if direction == "t2i":
            query = {"text": body.split("\n", 1)[0][len("Text: "):]}
            cands = [load_image(train.records[i].path) for i in e.images]
        else:
            query = {"image": load_image(train.records[e.images[0]].path)}
            cands = [t for _, t in sorted(re.findall(r"Text (\d+): (.*)\n", body), key=lambda x: int(x[0]))]
        stage = scoring.listwise_scores(mllm, section["user"], section["item"], query, cands,
                                        "image" if direction == "t2i" else "text")
        assert abs(trained - stage[int(e.answer) - 1]) < 1e-4, (direction, trained, stage)


def test_random_negatives_curriculum_goes_from_the_first_share_to_the_last():
    config = PretrainConfig(epochs=3, random_negatives=1.0, random_negatives_last=0.2)
    assert [round(config.random_share(e), 6) for e in range(4)] == [1.0, 0.6, 0.2, 0.2]
    assert PretrainConfig(epochs=3, random_negatives=0.3).random_share(2) == 0.3  # -1: no curriculum
    assert [round(config.random_share(e, span=2), 6) for e in range(3)] == [1.0, 0.2, 0.2]  # max_steps: 2 reached
    with pytest.raises(ValueError, match="random_negatives_last must be a share in \\[0, 1\\]"):
        PretrainConfig(random_negatives_last=1.5)


def test_twin_negatives_are_the_images_twins_drawn_anew_and_never_a_held_out_scene(world, clip_dir):
    from genret.world.scene import Scene

    train = world.split("train")
    held = world.split("val", "test")
    avoid = {Scene.from_dict(r.meta["scene"]).signature() for r in held.records}
    mix = mixture(train, clip_dir, PretrainConfig(twin_negatives=1.0), held_out=held)
    examples = mix.epoch(random.Random(0))
    n = len(train.records)
    scenes = [Scene.from_dict(r.meta["scene"]) for r in train.records]
    twins_of = [{t.signature() for t in (s.binding_twin(), s.relation_twin()) if t.signature() != s.signature()}
                for s in scenes]
    owner = {c: i for i, r in enumerate(train.records) for c in r.captions}
    assert mix.drawn and all(kind.signature(v) not in avoid for kind, v in mix.drawn)
    judged = drawn_seen = twin_texts = 0
    for e in (e for e in examples if e.task == "judge" and e.answer == "no"):
        text = re.search(r"Text: (.*)\n", _text(e)).group(1)
        judged += 1
        if e.images[0] >= n:  # t2i: the caption's image's twin, drawn
            kind, value = mix.drawn[e.images[0] - n]
            assert kind.signature(value) in twins_of[owner[text]] and text not in kind.captions(value, random.Random(0), 12)
            drawn_seen += 1
        elif text not in owner:  # i2t: a caption of the image's twin (no training image's)
            shown = scenes[e.images[0]]
            assert not any(text == c for c in shown.all_captions()) and text in {
                c for t in (shown.binding_twin(), shown.relation_twin()) for c in t.all_captions()}
            twin_texts += 1
    assert drawn_seen and twin_texts and drawn_seen + twin_texts > judged / 2
    for e in (e for e in examples if e.task == "pick" and _text(e).startswith("Text: ")):
        text = _text(e).split("\n", 1)[0][len("Text: "):]
        assert e.images[int(e.answer) - 1] == owner[text] and len(set(e.images)) == len(e.images)
    with pytest.raises(ValueError, match="twin_negatives must be a share in \\[0, 1\\]"):
        PretrainConfig(twin_negatives=-0.5)


def test_rewrite_examples_never_answer_with_a_held_out_scene(world, clip_dir):
    from genret.world.scene import Scene

    train, held = world.split("train"), world.split("val", "test")
    held_captions = {c for r in held.records for c in Scene.from_dict(r.meta["scene"]).all_captions()}
    config = PretrainConfig(tasks="rewrite", rewrite_per_image=4)
    plain = mixture(train, clip_dir, config).epoch(random.Random(0))
    assert [e for e in plain if e.answer in held_captions]  # edits do lead to held-out scenes
    kept = mixture(train, clip_dir, config, held_out=held).epoch(random.Random(0))
    assert kept and not [e for e in kept if e.answer in held_captions]
