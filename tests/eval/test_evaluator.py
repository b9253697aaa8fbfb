import json

import numpy as np

from genret.eval.evaluator import evaluate, twin_pairs
from genret.eval.report import write_report
from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline


def _brute_force_t2i_r1(encoder, test):
    imgs = encoder.encode_images([r.path for r in test.records])
    texts, owners = zip(*[(c, i) for i, r in enumerate(test.records) for c in r.captions])
    best = (encoder.encode_texts(list(texts)) @ imgs.T).argmax(axis=1)
    return 100 * float(np.mean(best == np.array(owners)))


def test_report_matches_brute_force_and_is_complete(encoder, world, tmp_path):
    pipe = RetrievalPipeline(PipelineConfig(name="t", encoder=EncoderConfig(model="x")), encoder=encoder)
    report = evaluate(pipe, world, split="test", progress=False)
    m = report["stages"]["prefilter"]
    for d in ("t2i", "i2t"):
        assert m[d]["R@1"] <= m[d]["R@5"] <= m[d]["R@10"] <= 100
    assert m["t2i"]["R@1"] == round(_brute_force_t2i_r1(encoder, world.split("test")), 2)
    assert m["RSUM"] == round(sum(m[d][k] for d in ("t2i", "i2t") for k in ("R@1", "R@5", "R@10")), 2)
    test = world.split("test")
    assert report["dataset"]["queries"] == {"t2i": sum(len(r.captions) for r in test.records), "i2t": len(test)}
    assert report["twins"]["prefilter"]["pairs"] == len(twin_pairs(test)) > 0
    assert 0 <= report["twins"]["prefilter"]["t2i"] <= 100
    write_report(report, tmp_path / "r")
    assert json.loads((tmp_path / "r" / "report.json").read_text())["stages"] == report["stages"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| prefilter" in md and "Twins" in md
    assert (tmp_path / "r" / "recall.png").stat().st_size > 1000
    curve = report["recall_curves"]["prefilter"]["t2i"]
    assert curve["1"] == m["t2i"]["R@1"] and list(curve.values()) == sorted(curve.values())


def test_twin_accuracy_counts_own_image_over_twin(encoder, world):
    test = world.split("test")
    pipe = RetrievalPipeline(PipelineConfig(encoder=EncoderConfig(model="x")), encoder=encoder)
    report = evaluate(pipe, world, split="test", directions=("t2i",), progress=False)
    recs = test.by_id()
    wins = total = 0
    for a, b in twin_pairs(test):
        for own, twin in ((a, b), (b, a)):
            iv = encoder.encode_images([recs[own].path, recs[twin].path])
            tv = encoder.encode_texts(list(recs[own].captions))
            s = tv @ iv.T
            wins += int((s[:, 0] > s[:, 1]).sum())
            total += len(s)
    assert report["twins"]["prefilter"]["t2i"] == round(100 * wins / total, 2)
    assert "i2t" not in report["stages"]["prefilter"]
