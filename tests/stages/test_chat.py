"""The chat (ChatIR) stage on the tiny world: answerers, the dialog's growth, guards, caches, config errors."""

import random

import pytest

from genret.world.scene import Scene, questions
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.world.answerers import SCRIPT, FactsAnswerer, answer_from_scene
from genret.stages.chat import (FALLBACK_QUESTIONS, UNKNOWN, Answerer, ChatConfig, ChatStage,
                                HumanAnswerer, MLLMAnswerer, Target, dialog_text,
                                initial_query)
from genret.types import Query


def _targets(world, n=4):
    records = world.split("test").records[:n]
    return records, [Target(id=r.id, image=str(r.path), meta=r.meta) for r in records]


def _queries(records, seed=0):
    return [Query(id=r.id, text=initial_query(r.meta, r.captions, r.id, seed)) for r in records]


def test_the_facts_answerer_answers_every_scene_question_truly(world):
    answerer = FactsAnswerer()
    assert isinstance(answerer, Answerer)
    for seed, r in enumerate(world.split("test").records):
        scene = Scene.from_dict(r.meta["scene"])
        pairs = questions(scene, random.Random(seed))
        q = Query(id=r.id, text="x", meta={"target": {"id": r.id, "scene": r.meta["scene"]}})
        said = answerer.answer([q] * len(pairs), [question for question, _ in pairs])
        assert [a.text for a in said] == [answer for _, answer in pairs], r.id
    # The scripted questions are answered from the scene's facts; what it cannot tell, it says so.
    facts = scene.facts()
    answers = [answer_from_scene(scene, s) for s in SCRIPT]
    assert answers[0] == facts["colours"] and answers[2] == facts["relation"] and answers[3] == facts["shapes"]
    a, b = scene.objects
    assert answer_from_scene(scene, "What else is in the image?", heard=f"a {a.noun()}") == f"a {b.noun(True)}"
    assert answer_from_scene(scene, SCRIPT[1], heard=f"{a.noun()}, {b.noun()}") == "nothing else"
    assert answer_from_scene(scene, "zq blorp?") is None
    assert answerer.answer([q], ["zq blorp?"])[0].text == UNKNOWN


def test_a_simulated_answerer_refuses_a_query_without_its_target():
    with pytest.raises(ValueError, match="query 'q7'.*needs the target's scene"):
        FactsAnswerer().answer([Query(id="q7", text="a red circle")], ["What colours are the objects?"])


def _chat(world, records, truth, rounds=3, **config):
    stage = ChatStage(ChatConfig(rounds=rounds, **config), "chat")
    queries = stage.start(_queries(records), truth)
    history = [queries]
    for _ in range(rounds):
        queries = stage.next_round(queries)
        history.append(queries)
    return stage, history


def test_the_dialog_grows_one_turn_per_round_and_is_the_query_text(world):
    records, truth = _targets(world)
    _, history = _chat(world, records, truth, rounds=3, questioner="scripted")
    for r, queries in enumerate(history):
        for q, rec in zip(queries, records):
            assert len(q.dialog) == 1 + 2 * r and len(q.meta["turns"]) == r
            assert q.dialog[0] == q.meta["initial"] == initial_query(rec.meta, rec.captions, rec.id)
            assert q.text == ", ".join([q.dialog[0]] + [f"{a} {b}" for a, b in zip(q.dialog[1::2], q.dialog[2::2])])
            assert q.meta["target"]["id"] == rec.id
    last = history[-1][0]
    assert [t["question"] for t in last.meta["turns"]] == list(SCRIPT[:3])
    assert last.meta["turns"][0]["answer"] == Scene.from_dict(records[0].meta["scene"]).facts()["colours"]
    # The other object: the one the initial query did not name.
    named = last.meta["initial"].removeprefix("a ")
    assert last.meta["turns"][1]["answer"] in {f"a {o.noun(True)}" for o in Scene.from_dict(
        records[0].meta["scene"]).objects if o.noun(True) != named}


def test_the_mllm_questioner_falls_back_and_says_so(world, talker_dir):
    records, truth = _targets(world, 3)
    # The untrained talker never ends within 3 tokens: each question is a runaway, replaced by a fixed one.
    stage, history = _chat(world, records, truth, rounds=2, model=str(talker_dir), max_new_tokens=3)
    for q in history[-1]:
        turns = q.meta["turns"]
        assert [t["question"] for t in turns] == list(FALLBACK_QUESTIONS[:2])
        assert all(t["question_fallback"] == "runaway" and t["raw_question"] for t in turns)
    assert stage.generated["question"] == 6


def test_the_mllm_answerer_sees_the_target_and_caches_answers(world, talker_dir, tmp_path):
    records, truth = _targets(world, 8)
    config = dict(questioner="scripted", answerer="mllm", model=str(talker_dir), answer_tokens=8,
                  cache_dir=str(tmp_path / "cache"))
    stage, history = _chat(world, records, truth, rounds=2, **config)
    turns = [q.meta["turns"] for q in history[-1]]
    assert all(t["raw_answer"] for ts in turns for t in ts)
    # Different images, one question: the talker's raw answers depend on the image.
    assert len({ts[0]["raw_answer"] for ts in turns}) > 1
    assert stage.generated["answer"] == 16
    again, history2 = _chat(world, records, truth, rounds=2, **config)
    assert again.generated == {"question": 0, "answer": 0, "summary": 0}
    assert [q.meta["turns"] for q in history2[-1]] == turns
    with pytest.raises(ValueError, match="needs the target's image"):
        MLLMAnswerer(again.answerer.mllm).answer([Query(id="q9", text="x", meta={"target": {"id": "t"}})], ["?"])


def test_caches_make_a_second_run_generate_nothing(world, talker_dir, tmp_path):
    records, truth = _targets(world, 3)
    config = dict(model=str(talker_dir), query_format="rewrite", max_new_tokens=3, cache_dir=str(tmp_path / "c"))
    first, h1 = _chat(world, records, truth, rounds=2, **config)
    assert first.generated["question"] == 6 and first.generated["summary"] == 6
    second, h2 = _chat(world, records, truth, rounds=2, **config)
    assert second.generated == {"question": 0, "answer": 0, "summary": 0}
    assert [(q.text, q.dialog, dict(q.meta)) for q in h1[-1]] == [(q.text, q.dialog, dict(q.meta)) for q in h2[-1]]
    # A runaway summary falls back to the joined dialog, saying so.
    q = h1[-1][0]
    assert q.meta["summary_fallback"] == "runaway" and q.text.startswith(q.meta["initial"] + ", ")


def test_a_dialog_past_the_context_stops_with_a_warning(world, talker_dir, caplog):
    records, truth = _targets(world, 2)
    probe = ChatStage(ChatConfig(model=str(talker_dir), max_new_tokens=3), "chat")
    started = probe.start(_queries(records), truth)
    rewriter = probe._rewriter("question")
    size = max(len(rewriter.mllm.tokenizer(rewriter.render({"dialog": dialog_text(q)}))["input_ids"]) for q in started)
    # Room for round 1's prompt and a few tokens more: round 2's prompt (one turn longer) does not fit.
    stage = ChatStage(ChatConfig(model=str(talker_dir), max_new_tokens=3, max_prompt_tokens=size + 8, rounds=3), "chat")
    queries = stage.start(_queries(records), truth)
    lengths = []
    with caplog.at_level("WARNING"):
        for _ in range(3):
            queries = stage.next_round(queries)
            lengths.append([len(q.meta["turns"]) for q in queries])
    # The prompt grows by a turn each round; once it no longer fits, the dialog stops and keeps its query.
    assert lengths == [[1, 1]] * 3, lengths
    stopped = [q for q in queries if q.meta["stopped"]]
    assert stopped and all(q.meta["stopped"].startswith("context:") for q in stopped)
    assert any("dialog stopped" in r.message and stopped[0].id in r.message for r in caplog.records)
    before = {q.id: q for q in stopped}
    assert all(stage.next_round([q])[0].text == before[q.id].text for q in stopped)


def test_a_person_can_answer(world):
    records, _ = _targets(world, 1)
    heard = []
    stage = ChatStage(ChatConfig(questioner="scripted", answerer="human", rounds=1), "chat",
                      answerer=HumanAnswerer(lambda shown: heard.append(shown) or "a blue one"))
    out = stage.rewrite([Query(id="q", text="a small red circle")], ctx=None)
    assert out[0].text == f"a small red circle, {SCRIPT[0]} a blue one" and "Q: " + SCRIPT[0] in heard[0]
    assert out[0].meta["target"] is None


def test_the_pipeline_runs_the_whole_dialog_and_the_prefilter_retrieves_with_it(world, clip_dir):
    records, truth = _targets(world, 4)
    pipe = RetrievalPipeline(PipelineConfig(name="chat", encoder=EncoderConfig(model=str(clip_dir)), stages=(
        {"type": "chat", "questioner": "scripted", "rounds": 2}, {"type": "prefilter", "k": 10})))
    pipe.index(world.split("test"), modalities=("image",), progress=False)
    queries = [Query(id=q.id, text=q.text, meta={"target": t.to_dict()}) for q, t in zip(_queries(records), truth)]
    (name, rankings), = pipe.run(queries)
    assert name == "prefilter" and [len(r.query.meta["turns"]) for r in rankings] == [2] * 4
    assert all(r.query.text.count(", ") >= 2 for r in rankings)


@pytest.mark.parametrize("config, match", [
    (dict(rounds=0), "rounds: must be at least 1, got 0"),
    (dict(questioner="oracle"), "questioner must be one of"),
    (dict(answerer="crowd"), "answerer must be one of"),
    (dict(query_format="json"), "query_format must be one of"),
    (dict(questioner="mllm"), "questioner = 'mllm' needs model"),
    (dict(questioner="scripted", answerer="mllm"), "answerer = 'mllm' needs model"),
    (dict(questioner="scripted", adapter="lora"), "needs questioner = 'mllm'"),
    (dict(model="m", max_prompt_tokens=-1), "max_prompt_tokens"),
])
def test_config_errors(config, match):
    with pytest.raises(ValueError, match=match):
        ChatConfig(**config)


@pytest.mark.parametrize("query, match", [
    (Query(id="q3", text="  "), "query 'q3': the initial query is empty"),
    (Query(id="q4", image="x.png", target="image"), "query 'q4': a dialog starts from a text"),
])
def test_unusable_initial_queries_are_refused(query, match):
    with pytest.raises(ValueError, match=match):
        ChatStage(ChatConfig(questioner="scripted"), "chat").start([query])


def test_next_round_needs_a_started_dialog():
    with pytest.raises(ValueError, match="query 'q5' has no dialog state"):
        ChatStage(ChatConfig(questioner="scripted"), "chat").next_round([Query(id="q5", text="a red circle")])


def test_the_facts_answerer_answers_questions_only():
    from genret.world.scene import Scene, SceneObject

    s = Scene((SceneObject("circle", "red", "small", 20, 32), SceneObject("square", "blue", "large", 44, 30)), "left of")
    # A caption said instead of a question (what an untrained questioner does) tells the user nothing to answer.
    assert answer_from_scene(s, "a large yellow one to the right of a small purple circle") is None
    assert answer_from_scene(s, "what is on the right") == "large blue square"
    assert answer_from_scene(s, "Where are the two objects?") == "the red circle is left of the blue square"


def test_answerers_are_registered_plug_ins(clip_dir):
    """A chat stage builds its answerer from the registry by name; another data set's simulated user plugs in."""
    from genret.mllm.rewriter import Rewrite
    from genret.stages.answerers import ANSWERERS

    assert {"facts", "human", "mllm"} <= set(ANSWERERS.names())

    class Echo:
        name = "echo"

        def answer(self, queries, questions):
            return [Rewrite(q, q) for q in questions]

    ANSWERERS.register("echo")(lambda stage: Echo())
    try:
        stage = ChatStage(ChatConfig(questioner="scripted", answerer="echo"), "chat")
        assert isinstance(stage._answerer(), Echo)
    finally:
        ANSWERERS._entries.pop("echo")
    with pytest.raises(ValueError, match="answerer must be one of"):
        ChatConfig(questioner="scripted", answerer="echo")


def test_the_worlds_simulated_users_are_plug_ins_found_through_the_entry_point():
    """A fresh process that never imports genret.world still finds 'facts' and 'scripted' (the genret.plugins entry
    point loads them); the stages themselves know nothing of the world."""
    import subprocess
    import sys

    code = ("import sys\nfrom genret.stages.chat import QUESTIONERS\nfrom genret.stages.answerers import ANSWERERS\n"
            "assert 'genret.world' not in sys.modules\n"
            "print(sorted(ANSWERERS.names()), sorted(QUESTIONERS.names()), 'genret.world.answerers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == "['facts', 'human', 'mllm'] ['mllm', 'scripted'] True"
