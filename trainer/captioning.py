"""Image captioning with transformers' BLIP (`BlipForConditionalGeneration`), for datasets that
have images but no captions: the caption settings, their checks, and the captioner itself.

Captions follow the "trigger word + description" practice (`nosnjaoutfit, a girl standing on a
set of stairs`): BLIP describes the image, `template` puts the trigger word with it.
`trainer.dataset_captions` decides which images need one and writes them.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-base"
DEFAULT_TEMPLATE = "{trigger}, {caption}"
TEMPLATE_FIELDS = ("trigger", "caption")


class CaptionConfig(BaseModel):
    """How a dataset's missing captions are written (`caption:` of a sweep spec or a training YAML)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_CAPTION_MODEL, min_length=1, description="BLIP captioning model: a hub id or a local "
                       "folder saved with save_pretrained (config.json, weights, processor and tokenizer files).")
    template: str = Field(DEFAULT_TEMPLATE, description="The caption written: {trigger} is the trigger word, "
                          "{caption} what BLIP says.")
    overwrite: bool = Field(False, description="Replace existing captions too (default: only images without one).")
    batch_size: int = Field(8, ge=1, le=1024, description="Images per BLIP forward pass.")
    max_new_tokens: int = Field(40, ge=1, le=512, description="Longest BLIP caption, in tokens.")

    @field_validator("template")
    @classmethod
    def _check_template(cls, template: str) -> str:
        problem = template_problem(template)
        if problem:
            raise ValueError(problem)
        return template


def template_problem(template: str) -> str | None:
    """Why `template` cannot make captions, or None: it must hold {caption} and {trigger} and no other field."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        return f"{template!r} is not a valid template ({err}); write {{{{ and }}}} for literal braces"
    unknown = sorted({name for name, _, _ in fields if name not in TEMPLATE_FIELDS})
    if unknown:
        return f"unknown field {{{unknown[0]}}} in {template!r}; the fields are {{trigger}} and {{caption}}"
    if any(spec or conv for _, spec, conv in fields):
        return f"{template!r}: write the fields plainly, {{trigger}} and {{caption}}, without format specs"
    missing = [f"{{{f}}}" for f in TEMPLATE_FIELDS if f not in {name for name, _, _ in fields}]
    if missing:
        return f"{template!r} has no {' and no '.join(missing)}; e.g. {DEFAULT_TEMPLATE!r}"
    return None


def apply_template(template: str, trigger: str, caption: str) -> str:
    """The caption written for one image; an empty BLIP caption leaves the trigger word alone."""
    text = template.format(trigger=trigger.strip(), caption=" ".join(caption.split()))
    return " ".join(text.split()).strip(" ,")


def _looks_local(model: str) -> bool:
    # Hub ids are "owner/name"; anything else that names a path is meant to be local.
    return model.startswith(("/", ".", "~")) or model.count("/") != 1 or Path(model).expanduser().exists()


def caption_model_problem(model: str) -> str | None:
    """Why the captioning model cannot be loaded here, found without loading it (None: it can)."""
    if _looks_local(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            return (f"{model}: not found; give a local BLIP folder saved with save_pretrained (config.json, "
                    f"model.safetensors, processor and tokenizer files) or a hub id such as {DEFAULT_CAPTION_MODEL}")
        if not (path / "config.json").is_file():
            return f"{model}: no config.json in the folder; save the model there with save_pretrained"
        return None
    from trainer.model_loading import _probe_hub

    if _cached(model):
        return None
    why = _probe_hub(model)
    if why:
        return (f"{model}: not in the local Hugging Face cache and the hub cannot be used ({why}); download it "
                "once where the hub is reachable (huggingface-cli download), or give a local folder")
    return None


def caption_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Captioner:
    """A BLIP captioning model and its processor, on the GPU when there is one (fp16 there)."""

    def __init__(self, model: str, device: torch.device | None = None):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.device = device or caption_device()
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        local = {"local_files_only": True} if not _looks_local(model) and _cached(model) else {}
        source = str(Path(model).expanduser()) if _looks_local(model) else model
        self.processor = BlipProcessor.from_pretrained(source, **local)
        self.model = BlipForConditionalGeneration.from_pretrained(source, dtype=self.dtype, **local).to(self.device).eval()

    @torch.no_grad()
    def caption(self, images: list[Image.Image], max_new_tokens: int = 40) -> list[str]:
        """One caption per image (RGB), as BLIP writes it (lower case, no trigger word)."""
        inputs = self.processor(images=images, return_tensors="pt")
        pixels = inputs["pixel_values"].to(device=self.device, dtype=self.dtype)
        out = self.model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens)
        return [text.strip() for text in self.processor.batch_decode(out, skip_special_tokens=True)]


def _cached(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json"), str)
