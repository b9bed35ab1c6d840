"""Prompt encoding with clip skip in the AUTOMATIC1111/kohya convention.

diffusers' pipeline `clip_skip` reaches for `text_encoder.text_model`, which transformers 5.x
no longer has, so the project encodes prompts itself and hands `prompt_embeds` to pipelines.
"""

from __future__ import annotations

import torch


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_token_ids(text_encoder, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Hidden states that condition the UNet.

    clip skip 1 (off) is the last layer after the final layer norm; clip skip N takes
    `hidden_states[-N]` and applies the final layer norm, as A1111 and kohya do.
    """
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1 (A1111 convention, 1 = off), got {clip_skip}")
    input_ids = input_ids.to(text_encoder.device)
    if clip_skip == 1:
        return text_encoder(input_ids).last_hidden_state
    out = text_encoder(input_ids, output_hidden_states=True)
    # hidden_states holds the embeddings output plus one entry per layer.
    layers = len(out.hidden_states) - 1
    if clip_skip > layers:
        raise ValueError(f"clip_skip {clip_skip} exceeds the text encoder's {layers} layers")
    return text_encoder.final_layer_norm(out.hidden_states[-clip_skip])


def encode_prompts(tokenizer, text_encoder, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    return encode_token_ids(text_encoder, tokenize(tokenizer, prompts), clip_skip)
