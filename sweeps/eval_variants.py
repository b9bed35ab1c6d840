"""The ways an evaluation samples beyond the plain suite, as the driver resolves them for the plan:
the suite's `guidance_scales`, `eval.lora_scales` and the suite's img2img items with their init
images, read once here (a trial runs where the suite's files may not exist).

None of them set (`plan_variants` returns None): each evaluation samples the suite once, at the
sampling's guidance scale and LoRA strength 1, as before. Otherwise every text-to-image item is
sampled at each (guidance scale, LoRA strength) pair, the first pair being the one whose images a
trial shows (its samples grid, the report's steps grid, W&B, the toy world's oracle), and the
img2img items once per strength at the sampling's guidance scale and LoRA strength 1
(`sweeps.variant_sampling`; the metrics in `evaluator.variant_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evaluator.suites import Img2ImgItem, PromptSuite, expand_img2img


@dataclass(frozen=True)
class EvalVariants:
    guidance_scales: tuple[float, ...] | None  # the suite's; None: the sampling's guidance_scale only
    lora_scales: tuple[float, ...] | None  # `eval.lora_scales`; None: strength 1 only
    img2img: tuple[Img2ImgItem, ...] = ()
    init_images: dict[str, np.ndarray] | None = None  # init image path -> uint8 HWC, as read

    def pairs(self) -> list[tuple[float | None, float | None]]:
        """Every (guidance scale, LoRA strength) sampled; None is the sampling's scale / strength 1."""
        return [(g, w) for g in self.guidance_scales or (None,) for w in self.lora_scales or (None,)]


def read_init_image(path: str) -> np.ndarray:
    """An init image as uint8 RGB HWC; raises ValueError saying what is wrong with the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image ({err})") from None


def init_image_problems(suite: PromptSuite) -> list[str]:
    """`img2img[i].init_image: ...` for every init image that is missing or unreadable."""
    out = []
    for i, p in enumerate(suite.img2img):
        try:
            read_init_image(p.init_image)
        except ValueError as err:
            out.append(f"img2img[{i}].init_image: {err}; give an image file (a relative path is relative to "
                       "the suite file, or to the spec file for a suite inline in it)")
    return out


def plan_variants(suite: PromptSuite | None, lora_scales: list[float] | None, trigger: str | None,
                  class_word: str | None) -> EvalVariants | None:
    """The plan's variants, or None when the suite and `eval.lora_scales` ask for none."""
    guidance = tuple(suite.guidance_scales) if suite is not None and suite.guidance_scales else None
    items = tuple(expand_img2img(suite, trigger, class_word)) if suite is not None else ()
    if guidance is None and not lora_scales and not items:
        return None
    images = {it.init_image: read_init_image(it.init_image) for it in items}
    return EvalVariants(guidance, tuple(lora_scales) if lora_scales else None, items, images or None)


def evaluation_cost(suite: PromptSuite | None, lora_scales: list[float] | None, n_items: int, steps: int,
                    trigger: str | None, class_word: str | None) -> tuple[int, int]:
    """(images, denoising steps) one evaluation samples: the suite's text-to-image items at each
    (guidance scale, LoRA strength) pair, and each img2img item for int(steps x strength) steps."""
    pairs = len(suite.guidance_scales or [None]) if suite is not None else 1
    pairs *= len(lora_scales or [None])
    img2img = expand_img2img(suite, trigger, class_word) if suite is not None else []
    return (n_items * pairs + len(img2img),
            n_items * pairs * steps + sum(int(steps * it.strength) for it in img2img))
