"""An adapter checkpoint saved against transformers 4.x module names (``model.layers.N`` where 5.x has
``model.language_model.layers.N``: every LoRA trained before 5.0, e.g. published rerankers and embedders) merges into
its base as the same adapter with 5.x names does. ``PeftModel.from_pretrained`` alone matches none of the old keys and
leaves the adapter at its identity start, silently (before the fix ``MLLM.load`` returned the bare base)."""

import shutil

import torch


def _lora_checkpoints(base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    new = tmp_path / "names-5"
    peft_model.save_pretrained(new)
    old = tmp_path / "names-4"
    old.mkdir()
    weights = load_file(new / "adapter_model.safetensors")
    renamed = {k.replace("base_model.model.model.language_model.", "base_model.model.model."): v
               for k, v in weights.items()}
    assert renamed.keys() != weights.keys()
    save_file(renamed, old / "adapter_model.safetensors", metadata={"format": "pt"})
    shutil.copy(new / "adapter_config.json", old / "adapter_config.json")
    merged = peft_model.merge_and_unload()
    return old, merged.model.language_model.layers[0].self_attn.q_proj.weight.detach().clone()


def test_adapter_checkpoint_with_transformers_4_names_merges(real_dirs, tmp_path):
    from genret.mllm import MLLM

    base_dir = real_dirs["qwen2-vl-2b-instruct"]
    old, want = _lora_checkpoints(base_dir, tmp_path)
    got = MLLM.load(str(old)).model.model.language_model.layers[0].self_attn.q_proj.weight.detach()
    from safetensors.torch import load_file

    base = load_file(base_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]  # 4.x names
    assert (want - base).abs().max() > 1e-2  # the adapter changes the weights
    assert torch.allclose(got, want, atol=1e-6)
