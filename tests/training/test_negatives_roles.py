"""Hard negatives mined with an instructed MLLM embedder (shrunk Qwen3-VL-Embedding, real tokenizer and template,
random weights) as the prefilter: each direction embeds its queries as queries and its candidates as documents, as
the served pipeline does (it refused the call without a role before); a CLIP-like encoder embeds once for both."""

import numpy as np
import pytest

from embedder_checkpoints import shared_qwen3_vl_embedding
from genret.training.negatives import caption_table, content_key, embed_as, mine_negatives, top_k

QUERY = "Retrieve images or text relevant to the user's query"


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    from genret.encoders.mllm import MLLMEmbedder

    # a query instruction of its own: with the authors' default the two roles embed alike
    return MLLMEmbedder(str(shared_qwen3_vl_embedding(tmp_path_factory)), embedder="qwen3-vl-embedding", device="cpu",
                        query_instruction=QUERY)


def test_mined_negatives_embed_each_side_in_its_role(embedder, world):
    data = world.split("val")
    texts, owners = caption_table(data)
    paths = [str(r.path) for r in data.records]
    k = 3
    groups, stats = mine_negatives(embedder, data, k)
    img = {role: embedder.encode_images(paths, role=role) for role in ("query", "document")}
    txt = {role: embedder.encode_texts(texts, role=role) for role in ("query", "document")}
    assert np.abs(img["query"] - img["document"]).max() > 1e-2  # the roles differ, so a swap would show
    keys, caption_sets = [content_key(r) for r in data.records], [set(r.captions) for r in data.records]
    same = max(keys.count(x) for x in keys)
    most = max(len(r.captions) for r in data.records)
    t2i = top_k(img["document"], txt["query"], k + same)
    i2t = top_k(txt["document"], img["query"], k + same * most)
    want_t2i = [tuple([i for i in row if keys[i] != keys[owners[c]] and texts[c] not in caption_sets[i]][:k])
                for c, row in enumerate(t2i)]
    want_i2t = [tuple([c for c in row if keys[owners[c]] != keys[i] and texts[c] not in caption_sets[i]][:k])
                for i, row in enumerate(i2t)]
    assert [g.negatives for g in groups if g.direction == "t2i"] == want_t2i
    assert [g.negatives for g in groups if g.direction == "i2t"] == want_i2t
    r1 = 100 * np.mean([row[0] == owners[c] for c, row in enumerate(t2i)])
    assert stats["t2i"]["prefilter_R@1"] == round(float(r1), 2)


def test_embed_as_embeds_once_where_the_roles_embed_alike(_encoder, world):
    paths = [str(r.path) for r in world.split("val").records[:3]]
    out = embed_as(_encoder, "image", paths, ("document", "query"))
    assert out["query"] is out["document"]  # one call: a CLIP-like encoder's roles share their vectors
    assert np.abs(out["query"] - _encoder.encode_images(paths)).max() < 1e-6
