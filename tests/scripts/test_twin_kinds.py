"""scripts/twin_kinds.py: each twin pair sorted by kind, every scorer through the stages' own scores."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "twin_kinds.py"


def test_pairs_are_sorted_into_binding_and_relation_twins(world):
    from genret.eval.evaluator import twin_pairs
    from genret.world.scene import Scene

    script = load_script("twin_kinds")
    import random

    test = world.split("test")
    cases = script.rows(test, random.Random(0))
    assert len(cases) == 4 * len(twin_pairs(test)) > 0
    by_path = {str(r.path): Scene.from_dict(r.meta["scene"]) for r in test.records}
    for c in (c for c in cases if c["dir"] == "t2i"):
        a, b = by_path[c["right"]], by_path[c["twin"]]
        twin = a.binding_twin() if c["kind"] == "binding" else a.relation_twin()
        assert twin.signature() == b.signature() and c["text"] in a.all_captions()
    a = next(iter(by_path.values()))
    assert script.kind_of(a, a.relation_twin()) == "relation"


def test_the_table_scores_every_kind_and_the_places_of_the_tokens(world_dir, clip_dir, mllm_dir):
    out = subprocess.run([sys.executable, str(SCRIPT), "--clip", str(clip_dir), "--mllm", str(mllm_dir), "--data",
                          str(world_dir), "--split", "test", "--positions", "--places", "--attention", "--threads", "1",
                          "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert sum(result["cases"].values()) > 0
    scorers = result["right_%"]
    assert set(scorers) == {"prefilter (CLIP)", f"{mllm_dir} generative", f"{mllm_dir} pointwise"}
    assert all(0 <= v <= 100 for row in scorers.values() for v in row.values())
    levels = result["positions_%"][str(mllm_dir)]
    assert "projected (the language model's input)" in levels and any(k.startswith("tower layer") for k in levels)
    assert any(k.startswith("language model layer") for k in levels)
    assert all(0 <= acc[w] <= 100 for acc in levels.values() for w in ("column", "row"))
    attention = result["attention"][str(mllm_dir)]
    assert set(attention) == {"where", "colour"}
    for layers in attention.values():
        assert [row["layer"] for row in layers] == list(range(1, len(layers) + 1)) and layers
        for row in layers:
            assert len(row["asked"]) == len(row["other"]) == len(row["image"]) > 0
            assert all(0 <= x + y <= z + 1e-3 <= 1.001 for x, y, z in zip(row["asked"], row["other"], row["image"]))
    places = result["places_%"][str(mllm_dir)]
    assert "axis" in places and set(places) <= {"left / right", "above / below", "axis"}
    assert all(0 <= v <= 100 for v in places.values())


def test_the_place_probe_reads_a_qwen2_vl_grid_of_merged_tokens(world, tmp_path):
    """Qwen2-VL's features come as (rows, cols, hidden) and its tower has no CLIP layers: the probe reads the merged
    tokens' grid, nothing else."""
    from genret.mllm import MLLM
    from genret.mllm.tiny import build_tiny

    script = load_script("twin_kinds")
    mllm = MLLM.load(str(build_tiny("qwen2_vl", tmp_path / "q", ["a red circle left of a blue square"])))
    levels = script.position_probe(mllm, world.split("val"), n_fit=12, n_test=6)
    assert list(levels)[0] == "projected (the language model's input)" and not any("tower" in k for k in levels)
    # the image tokens' own states at each language-model layer (multimodal RoPE positions passed as scoring does)
    assert [k for k in levels if k.startswith("language model layer")] == [
        f"language model layer {k} (at the image tokens)" for k in range(1, mllm.model.config.text_config.num_hidden_layers + 1)]
    assert all(0 <= v <= 100 for acc in levels.values() for v in acc.values())
    import pytest

    with pytest.raises(SystemExit, match="--attention reads LLaVA's raster"):
        script.object_attention(mllm, world.split("val"))


def test_place_questions_ask_where_each_object_is_as_pretraining_does(world):
    """The true answer is the one the pretraining's answer task teaches for that question; the other, its inverse."""
    import random

    from genret.world.scene import Scene, questions

    script = load_script("twin_kinds")
    for r in world.split("val").records[:20]:
        scene = Scene.from_dict(r.meta["scene"])
        taught = dict(q for q in questions(scene, random.Random(0)) if q[0].startswith("Where is"))
        asked = script.place_questions(scene)
        assert len(asked) == 2 and asked[0][0] != asked[1][0]
        for question, true, inverse, across in asked:
            assert taught.get(question, true) == true and true != inverse
            assert true.split(" the ")[0] in ("left of", "right of", "above", "below")
            axes = [{"left of": "h", "right of": "h", "above": "v", "below": "v"}[t.split(" the ")[0]]
                    for t in (true, inverse, *across)]
            assert axes[0] == axes[1] and axes[2] == axes[3] != axes[0]
        a, b = scene.objects
        assert asked[0][1] == f"{scene.relation} the {b.noun()}"
