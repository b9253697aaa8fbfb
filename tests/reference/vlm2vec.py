"""VLM2Vec(-V2)'s reference embedding procedure on Qwen2-VL, step by step, for the parity tests.

Written for genret from TIGER-AI-Lab/VLM2Vec (Apache-2.0) @ 6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16: the prompt of
``process_input_text`` and of the MMEB retrieval parsers (``src/model/processor.py``,
``src/data/eval_dataset/image_t2i_eval.py`` / ``image_i2t_eval.py``: the ``" \\n" -> "\\n"`` rewrite and the final
``"\\n"``), the batching of ``Qwen2_VL_process_fn`` (one processor call per input, images with a side under 28
pixels resized to 56x56, then ``tokenizer.pad``), the processor bounds of ``load_processor`` with
``DataArguments``' defaults (``resize_min_pixels`` 28*28*4, ``resize_max_pixels`` 28*28*1280, passed as
``size``), ``Qwen2VLForConditionalGeneration.forward`` and ``get_rope_index`` of its fork
``src/model/vlm_backbone/qwen2_vl/modeling_qwen2_vl.py``, and ``MMEBModel.encode_input`` / ``_pooling``
(``src/model/model.py``; ``pooling='last'``, ``normalize=True`` as its demos and eval scripts set). Not their text
(fetched code stays out of commits here); the authors' code itself was run once outside the repository against this
transcription (``docs/real-checkpoints.md`` gives the figure).

What the fork computes that a stock transformers 5.24 forward does not: VLM2Vec writes the bare ``<|image_pad|>``
(no ``<|vision_start|>``), and the fork's ``get_rope_index`` counts images by the token after each
``<|vision_start|>``; it finds none, so every token, image tokens included, gets a plain 1-D position (the
attention mask's cumulative sum). Stock 5.24 finds image tokens through the processor's ``mm_token_type_ids`` and
gives them 3-D grid positions. Here the fork's forward is written on the stock modules: the vision tower
(``model.model.visual``), the spliced embeddings, and the text decoder (``model.model.language_model``) called with
those 1-D positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_TOKEN = "<|image_pad|>"
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 1280


def process_input_text(instruction: str, text: str | None = None, add_image_token: bool = False) -> str:
    """``process_input_text`` for the Qwen2-VL backbone."""
    prompt = instruction
    if text:
        prompt = prompt + " " + text
    if add_image_token:
        prompt = IMAGE_TOKEN + " " + prompt
    return prompt


def query_text(instruction: str, text: str) -> str:
    """A text query as ``image_t2i_eval.data_prepare`` writes it (``qry_inst + ' ' + qry_text + '\\n'``)."""
    return instruction + " " + text + "\n"


def image_input(instruction: str, text: str | None = None) -> str:
    """An image input (an image document of ``image_t2i_eval``, an image query of ``image_i2t_eval``): the
    instruction as the MMEB data writes it after ``<|image_1|>`` (``"\\n" + instruction``)."""
    return process_input_text("\n" + instruction, text, add_image_token=True).replace(" \n", "\n") + "\n"


def load_processor(path):
    """``load_processor`` for ``qwen2_vl``: the checkpoint's processor with ``DataArguments``' pixel bounds."""
    from genret.mllm.backend import load_processor as genret_load_processor  # stock Qwen2VLProcessor, no video part

    return genret_load_processor(str(path), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def _process(texts: list[str], images: list, processor) -> dict:
    """``Qwen2_VL_process_fn``: one processor call per input, then the ids padded together."""
    input_ids, pixel_values, grids = [], [], []
    for text, image in zip(texts, images):
        if image is None:
            out = processor(text=[text], images=None, return_tensors="pt")
            pixel_values.append(None)
            grids.append(None)
        else:
            if image.size[0] < 28 or image.size[1] < 28:
                image = image.resize((56, 56))
            out = processor(text=[text], images=[image], return_tensors="pt")
            pixel_values.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
        input_ids.append(out["input_ids"][0].tolist())
    batch = processor.tokenizer.pad({"input_ids": input_ids}, return_tensors="pt")
    return {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long(),
            "pixel_values": pixel_values, "image_grid_thw": grids}


@torch.no_grad()
def embed(model, processor, texts: list[str], images: list, stock_positions: bool = False) -> torch.Tensor:
    """``MMEBModel.encode_input`` of ``len(texts)`` inputs (``images[i]`` None for a text-only input): normalised
    last-token embeddings. ``stock_positions`` runs the stock 5.24 forward on the same ids instead (3-D M-RoPE
    positions for the image tokens), to show the difference."""
    inputs = _process(texts, images, processor)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    base = model.model
    embeds = base.get_input_embeddings()(ids)
    with_image = [i for i, g in enumerate(inputs["image_grid_thw"]) if g is not None]
    if stock_positions:
        pv = torch.cat([inputs["pixel_values"][i] for i in with_image]) if with_image else None
        grid = torch.cat([inputs["image_grid_thw"][i] for i in with_image]) if with_image else None
        types = (ids == model.config.image_token_id).int()
        hidden = base(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                      mm_token_type_ids=types).last_hidden_state
    else:
        if with_image:  # the fork: the image features of the rows with an image, spliced into those rows
            pv = torch.cat([inputs["pixel_values"][i] for i in with_image]).type(base.visual.dtype)
            grid = torch.cat([inputs["image_grid_thw"][i] for i in with_image])
            feats = base.visual(pv, grid_thw=grid).pooler_output.to(embeds.dtype)
            rows = embeds[with_image].masked_scatter((ids[with_image] == model.config.image_token_id).unsqueeze(-1),
                                                     feats)
            embeds = embeds.clone()
            embeds[with_image] = rows
        # get_rope_index: no <|vision_start|>, so no image is counted: 1-D positions over the attended tokens
        # (padding positions get 1, as the fork's torch.ones start)
        positions = mask.cumsum(-1) - 1
        positions = positions.masked_fill(mask == 0, 1).unsqueeze(0).expand(3, -1, -1)
        hidden = base.language_model(inputs_embeds=embeds, attention_mask=mask,
                                     position_ids=positions).last_hidden_state
    # _pooling('last'): the last position under left padding, else the last attended one
    if mask[:, -1].sum() == mask.shape[0]:
        reps = hidden[torch.arange(hidden.shape[0]), -1]
    else:
        reps = hidden[torch.arange(hidden.shape[0]), mask.sum(dim=1) - 1]
    return F.normalize(reps, p=2, dim=-1)
