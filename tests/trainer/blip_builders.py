"""A tiny random BLIP captioner saved in the hub's layout (the real one cannot be downloaded here):
its captions are nonsense, but loading, batching, generation and decoding are the real code."""

from pathlib import Path

import torch
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

WORDS = ["a", "dog", "cat", "red", "blue", "on", "the", "grass", "sitting", "picture", "of", "circle"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # BLIP's decoder starts at [DEC], stops at [SEP]


def tiny_blip(folder: Path) -> Path:
    """A 2-layer BLIP (32 px images) with a 12-word BERT vocabulary, saved into `folder` once."""
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    small = dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=2)
    config = BlipConfig(
        text_config=dict(vocab_size=len(SPECIAL + WORDS), encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=5, pad_token_id=0, sep_token_id=3, eos_token_id=3, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=32, image_text_hidden_size=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder
