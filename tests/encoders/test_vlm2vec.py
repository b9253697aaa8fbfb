"""VLM2Vec(-V2) as the prefilter encoder: genret's embeddings equal the authors' procedure
(``tests/reference/vlm2vec.py``, checked once against TIGER-AI-Lab/VLM2Vec's own code) at fp32, 1e-4, on the shrunk
Qwen2-VL-2B-Instruct build with its real tokenizer and processor settings; whole checkpoints and DoRA adapters
saved against transformers 4.x."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from embedder_checkpoints import copy_checkpoint
from genret.encoders.embedders import resolve_spec
from genret.encoders.mllm import MLLMEmbedder

ATOL = 1e-4
QUERY = "Find me an everyday image that matches the given caption:"
IMAGE_DOC = "Represent the given image."
TEXTS = ["a red circle left of a blue square", "two small cats on a sofa", "Ein Hund im Schnee"]
# on the 28-pixel grid, off it, over nothing (300x200), and under 28 pixels a side (resized to 56x56 first)
SIZES = [(56, 56), (45, 70), (300, 200), (20, 40)]


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.fixture(scope="module")
def base_dir(real_dirs):
    return real_dirs["qwen2-vl-2b-instruct"]  # VLM2Vec-V2's weights are a stock qwen2_vl checkpoint (merged)


def _reference(path, adapter=None):
    from transformers import AutoModelForImageTextToText

    from reference import vlm2vec as ref

    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    processor = ref.load_processor(path)
    return lambda texts, images: ref.embed(model, processor, texts, images).numpy(), model, processor


def _check(encoder, reference):
    """Text queries, image documents, image + text queries and text documents equal the reference's."""
    from reference import vlm2vec as ref

    images = _images()
    queries = encoder.encode_texts(TEXTS, role="query")
    assert np.abs(queries - reference([ref.query_text(QUERY, t) for t in TEXTS], [None] * 3)).max() < ATOL
    docs = encoder.encode_images(images, role="document")
    assert np.abs(docs - reference([ref.image_input(IMAGE_DOC)] * len(images), images)).max() < ATOL
    pairs = encoder.encode_pairs(images[:3], TEXTS)
    assert np.abs(pairs - reference([ref.image_input(QUERY, t) for t in TEXTS], images[:3])).max() < ATOL
    text_docs = encoder.encode_texts(TEXTS, role="document")  # as they are: MMEB's text candidates
    assert np.abs(text_docs - reference(TEXTS, [None] * 3)).max() < ATOL
    return docs


def test_vlm2vec_equals_the_authors_procedure(base_dir):
    from reference import vlm2vec as ref

    assert resolve_spec("", "VLM2Vec/VLM2Vec-V2.0").name == "vlm2vec"
    encoder = MLLMEmbedder(str(base_dir), embedder="vlm2vec", device="cpu")
    reference, model, processor = _reference(base_dir)
    docs = _check(encoder, reference)
    # over the authors' 1,003,520-pixel bound (the checkpoint's own processor allows 12.8 M): scaled down to it
    big = Image.fromarray(np.random.default_rng(5).integers(0, 255, (1000, 1100, 3), dtype=np.uint8))
    want = reference([ref.image_input(IMAGE_DOC)], [big])
    assert np.abs(encoder.encode_images([big], role="document") - want).max() < ATOL
    assert encoder._gme.processor.image_processor.size["longest_edge"] == 1280 * 28 * 28
    # text documents take no instruction (a spec field, not a branch on the engine's name): the document settings
    # (an index manifest's, the cache key's) record what a text gallery was embedded under, not only the image one
    assert not encoder.spec.text_documents_instructed and not resolve_spec("vlm2vec-v1", "").text_documents_instructed
    documents = encoder.settings("document")
    assert documents["instruction"] == IMAGE_DOC and documents["text_instruction"] == ""
    assert "text_instruction" not in encoder.settings("query")
    # VLM2Vec's positions are 1-D: the stock forward's 3-D M-RoPE positions give other image embeddings
    stock = ref.embed(model, processor, [ref.image_input(IMAGE_DOC)] * 4, _images(), stock_positions=True).numpy()
    assert np.abs(stock - docs).max() > 1e-3
    with pytest.raises(ValueError, match="not trained for truncated"):
        MLLMEmbedder(str(base_dir), embedder="vlm2vec", device="cpu", dim=32)


@pytest.mark.slow
def test_vlm2vec_v1_resizes_images_as_its_mmeb_run(base_dir):
    """v1 (TIGER-Lab/VLM2Vec-Qwen2VL-*): the same procedure, its MMEB run resizing every image to 1344x1344 first
    (``MultimodalEvalDataCollator`` under ``--resize_use_processor false --image_resolution high``)."""
    from reference import vlm2vec as ref

    assert resolve_spec("", "TIGER-Lab/VLM2Vec-Qwen2VL-2B").name == "vlm2vec-v1"
    reference, _, _ = _reference(base_dir)
    v1 = MLLMEmbedder(str(base_dir), embedder="vlm2vec-v1", device="cpu")
    image = _images()[1]
    want = reference([ref.image_input(IMAGE_DOC)], [image.resize((1344, 1344))])
    assert np.abs(v1.encode_images([image], role="document") - want).max() < ATOL
    assert v1.describe()["settings"]["image_size"] == [1344, 1344]


def _dora_adapter(base_dir, out):
    """A DoRA adapter as VLM2Vec's ``MMEBModel.build`` configures one, with random (non-identity) weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=64, lora_dropout=0.1, init_lora_weights="gaussian", use_dora=True,
                        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "k_proj", "q_proj",
                                        "out_proj", "v_proj", "gate_proj", "up_proj"])
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
            elif "lora_magnitude" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    peft_model.save_pretrained(out)
    return out


def _as_saved_by_transformers_4(adapter, out):
    """The same adapter with the module names of transformers 4.x (``model.layers``), as adapters trained before
    5.0 (VLM2Vec's authors pin 4.52.3) are published; only the key names change."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    weights = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("base_model.model.model.language_model.", "base_model.model.model."): v
               for k, v in weights.items()}
    assert renamed.keys() != weights.keys()
    save_file(renamed, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    return out


@pytest.mark.slow
def test_vlm2vec_dora_adapter_saved_by_transformers_4_loads_onto_its_base(base_dir, tmp_path):
    """An adapter checkpoint (no config.json, or a config.json and no weights) merges into the base its
    adapter_config.json names, its 4.x key names mapped onto 5.x's modules; peft alone leaves such an adapter at its
    identity start, silently."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    adapter = _dora_adapter(base_dir, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["use_dora"]
    published = _as_saved_by_transformers_4(adapter, tmp_path / "published")
    reference, _, _ = _reference(base_dir, adapter)
    encoder = MLLMEmbedder(str(published), embedder="vlm2vec", device="cpu")
    docs = _check(encoder, reference)
    # the layout VLM2Vec's own loading reads: config.json and the adapter in one folder, the weights the base's
    beside = copy_checkpoint(published, tmp_path / "beside")
    (beside / "config.json").write_text((base_dir / "config.json").read_text())
    with_config = MLLMEmbedder(str(beside), embedder="vlm2vec", device="cpu")
    assert np.abs(with_config.encode_images(_images(), role="document") - docs).max() < ATOL
    plain = MLLMEmbedder(str(base_dir), embedder="vlm2vec", device="cpu")
    assert np.abs(plain.encode_images(_images(), role="document") - docs).max() > 1e-3  # the adapter counts
    assert encoder.revision != plain.revision  # the adapter's files and its base's
    # what peft does with the 4.x names on its own: nothing (the adapter's B stays at zero)
    stock = AutoModelForImageTextToText.from_pretrained(str(base_dir), dtype=torch.float32)
    before = stock.model.language_model.layers[0].mlp.down_proj.weight.clone()
    merged = PeftModel.from_pretrained(stock, str(published)).merge_and_unload()
    assert torch.allclose(merged.model.language_model.layers[0].mlp.down_proj.weight, before, atol=1e-6)
