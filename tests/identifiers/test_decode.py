"""Trie-constrained beam search on a tiny LLaVA: every result is an identifier, and training shows through."""

import numpy as np
import pytest
import torch
from PIL import Image

from genret.identifiers import Trie, add_tokens, constrained_beam_search, make_identifiers, tokenize

ITEMS = [f"img{i:03d}" for i in range(60)]
PROMPTS = ["which image shows a red circle left of a blue square?", "a small green star"]
SCHEMES = {
    "string": {},
    "numeric": {"width": 2},
    "semantic": {"texts": {i: ["a red circle", f"a blue square {i}"] for i in ITEMS}},
    "structured": {"embeddings": np.random.default_rng(0).normal(size=(len(ITEMS), 8)), "k": 4, "leaf_size": 6},
    "atomic": {},
}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    from genret.mllm.tiny import build_tiny

    texts = PROMPTS + ["a red circle", "a blue square img 0123456789"]
    return build_tiny("llava", tmp_path_factory.mktemp("tiny") / "llava", texts)


def _load(llava_dir, scheme):
    """The tiny LLaVA with ``scheme``'s tokens added, its processor and the scheme's trie."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(llava_dir)
    model = AutoModelForImageTextToText.from_pretrained(llava_dir).eval()
    ids = make_identifiers(scheme, ITEMS, **SCHEMES[scheme])
    torch.manual_seed(0)  # the new embedding rows are drawn at random
    add_tokens(ids, processor.tokenizer, model)
    return model, processor, ids, Trie.from_identifiers(ids, processor.tokenizer)


def _inputs(processor, prompts, image=False):
    content = [{"type": "image"}] if image else []
    texts = [processor.apply_chat_template([{"role": "user", "content": content + [{"type": "text", "text": p}]}],
                                           add_generation_prompt=True) for p in prompts]
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8))
              for i in range(len(prompts))] if image else None
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def _check_ranked(hits, trie, n):
    items = [h.item_id for h in hits]
    assert None not in items and len(set(items)) == len(items) == n  # n distinct items, none dropped
    assert all(trie.lookup(h.tokens) == h.item_id for h in hits)  # every sequence is the identifier of its item
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_result_is_an_identifier_and_unconstrained_ones_are_not(llava_dir, scheme):
    model, processor, ids, trie = _load(llava_dir, scheme)
    top = trie.subset(ITEMS[10:15])
    for image in (False, True):
        inputs = _inputs(processor, PROMPTS, image=image)
        for t, n in ((trie, 8), (top, 5)):
            results = constrained_beam_search(model, inputs, t, num_beams=8)
            assert len(results) == len(PROMPTS)
            for hits in results:
                _check_ranked(hits, t, n)
            if t is top:  # fewer identifiers than beams: each of the 5 items once
                assert all(sorted(h.item_id for h in hits) == ITEMS[10:15] for hits in results)
        # The same search without the constraint leaves the trie: the check above can fail.
        free = constrained_beam_search(model, inputs, trie, num_beams=8, constrain=False)
        assert any(h.item_id is None and h.tokens not in trie for hits in free for h in hits)
        assert all(h.item_id == trie.lookup(h.tokens) for hits in free for h in hits)
        blind = constrained_beam_search(model, inputs, None, num_beams=4, max_new_tokens=trie.max_length)
        assert all(h.item_id is None for hits in blind for h in hits) and all(len(h) for h in blind)


def test_batched_left_padded_prompts_decode_as_alone(llava_dir):
    model, processor, ids, trie = _load(llava_dir, "structured")
    together = constrained_beam_search(model, _inputs(processor, PROMPTS), trie, num_beams=5)
    for prompt, hits in zip(PROMPTS, together):
        [alone] = constrained_beam_search(model, _inputs(processor, [prompt]), trie, num_beams=5)
        assert [h.item_id for h in hits] == [h.item_id for h in alone]
        assert np.allclose([h.score for h in hits], [h.score for h in alone], atol=1e-4)


def test_one_trie_per_prompt(llava_dir):
    model, processor, ids, trie = _load(llava_dir, "atomic")
    subsets = [ITEMS[:3], ITEMS[40:44]]
    results = constrained_beam_search(model, _inputs(processor, PROMPTS), [trie.subset(s) for s in subsets],
                                      num_beams=6)
    assert [sorted(h.item_id for h in hits) for hits in results] == subsets


def test_bad_calls_are_refused(llava_dir):
    model, processor, ids, trie = _load(llava_dir, "atomic")
    inputs = _inputs(processor, PROMPTS)
    with pytest.raises(ValueError, match="2 tries for 1 prompts"):
        constrained_beam_search(model, _inputs(processor, PROMPTS[:1]), [trie, trie])
    with pytest.raises(ValueError, match="must not exceed num_beams"):
        constrained_beam_search(model, inputs, trie, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="needs max_new_tokens"):
        constrained_beam_search(model, inputs, None)
    processor.tokenizer.padding_side = "right"
    right = processor(text=[processor.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                            for p in PROMPTS], padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="right-padded"):
        constrained_beam_search(model, right, trie)


@pytest.mark.parametrize("scheme", ["atomic", "numeric", "structured"])
def test_a_trained_identifier_comes_first(llava_dir, scheme):
    model, processor, ids, trie = _load(llava_dir, scheme)
    inputs = _inputs(processor, PROMPTS[:1])
    [before] = constrained_beam_search(model, inputs, trie, num_beams=5)
    # The item to teach is one the untrained model does not put first (so the test can fail).
    wanted = "img042" if before[0].item_id != "img042" else "img017"
    target = ITEMS.index(wanted)
    answer = torch.tensor([tokenize(ids, processor.tokenizer)[target]])
    ids_in = torch.cat([inputs["input_ids"], answer], dim=1)
    labels = torch.cat([torch.full_like(inputs["input_ids"], -100), answer], dim=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(50):
        loss = model(input_ids=ids_in, attention_mask=torch.ones_like(ids_in), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    [after] = constrained_beam_search(model, inputs, trie, num_beams=5)
    assert after[0].item_id == wanted
    assert after[0].score > np.log(0.5)  # most of the probability mass is on it
