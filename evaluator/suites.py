"""Prompt suites: which prompts a LoRA is judged on, at which seeds.

A suite lists templates under four keys, each a list of strings or `{prompt, seeds}` maps:

```yaml
seeds: [0, 1]            # default seeds of every prompt (fixed: every trial samples the same)
natural:                 # the concept in a natural setting (like its training images)
  - "a photo of {trigger} {class}"
new_setting:             # the concept somewhere it was never shown
  - {prompt: "{trigger} {class} on a beach at sunset", seeds: [3, 4, 5]}
no_concept:              # no concept: the base model's knowledge must survive
  - "a bowl of fruit on a wooden table"
trigger_test:            # each sampled twice per seed: with {trigger} and with it removed
  - "a photo of {trigger} {class}"
guidance_scales: [5.0, 7.5, 10.0]   # optional: every text-to-image item at each scale (> 0)
img2img:                 # optional: image-to-image from a starting picture, at each strength
  - {prompt: "{trigger} {class}, anime style", init_image: images/portrait.png,
     strengths: [0.65, 0.8], seeds: [0]}
```

Placeholders: `{trigger}` (the trigger word) and `{class}` (the class word, e.g. "outfit"); no
others. `expand_suite` turns a suite into `SuiteItem(kind, prompt, seed)`s with kinds
`KINDS`; the trigger test gives `trigger_on` and `trigger_off` items, the j-th of one paired
with the j-th of the other (same template, same seed).

CLIP-T scores each image against `clip_text(item.prompt, trigger)`: the prompt without the trigger
word, which is a rare token that means nothing to CLIP (so both halves of the trigger test are
scored against the same text). Set `score_with_trigger: true` to keep it.

`guidance_scales` (none: the sampling's own `guidance_scale`) samples every text-to-image item
once per scale; `expand_suite` is the same for each. `img2img` items (`expand_img2img`) start from
`init_image` (a path relative to the suite file; for a suite inline in a sweep spec, relative to
the spec file), are noised by each of `strengths` (in (0, 1]: 1 keeps nothing of the image) and
denoised towards the prompt; they are scored apart from the kinds above
(`evaluator.variant_metrics.img2img_metrics`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.yaml_files import YamlFileError, read_yaml

KINDS = ("natural", "new_setting", "no_concept", "trigger_on", "trigger_off")
PROMPT_KINDS = ("natural", "new_setting", "no_concept")  # the kinds that make up `clip_score`
CONCEPT_KINDS = ("natural", "new_setting", "trigger_on")  # images that should show the concept
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_ALLOWED = {"trigger", "class"}


class SuiteError(ValueError):
    """A suite file or mapping that does not validate; the message names the file and key."""


class SuiteItem(NamedTuple):
    kind: str
    prompt: str
    seed: int


class Img2ImgItem(NamedTuple):
    prompt: str
    init_image: str  # the path as the suite gives it, resolved (see `resolve_init_images`)
    strength: float
    seed: int


class SuitePrompt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: str = Field(min_length=1, description="Template with {trigger} / {class}.")
    seeds: list[int] | None = Field(None, min_length=1, description="Overrides the suite's seeds.")

    @field_validator("prompt")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        bad = sorted(set(_PLACEHOLDER.findall(v)) - _ALLOWED)
        if bad:
            raise ValueError(f"unknown placeholder(s) {['{' + b + '}' for b in bad]} in {v!r}; "
                             "allowed: {trigger}, {class}")
        return v


def distinct(values: list[float], name: str) -> list[float]:
    """`values` when no value repeats: each value of a sampling setting names its own metrics."""
    if len(set(values)) != len(values):
        raise ValueError(f"{name} {values} repeat a value; each names its own metrics")
    return values


class Img2ImgPrompt(SuitePrompt):
    init_image: str = Field(min_length=1, description="The starting picture (relative to the suite file).")
    strengths: list[float] = Field(min_length=1, description="img2img strengths, each in (0, 1].")

    @field_validator("strengths")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not 0 < s <= 1]
        if bad:
            raise ValueError(f"strength {bad[0]} is outside (0, 1]: it is the share of the denoising that "
                             "redraws the init image (0.65 keeps its layout, 1 keeps nothing of it)")
        return distinct(v, "strengths")


def _as_prompt(v: object) -> object:
    return {"prompt": v} if isinstance(v, str) else v


class PromptSuite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "suite"
    seeds: list[int] = Field([0, 1], min_length=1, description="Default seeds per prompt.")
    natural: list[SuitePrompt] = Field(default_factory=list)
    new_setting: list[SuitePrompt] = Field(default_factory=list)
    no_concept: list[SuitePrompt] = Field(default_factory=list)
    trigger_test: list[SuitePrompt] = Field(default_factory=list)
    score_with_trigger: bool = Field(False, description="CLIP-T text keeps the trigger word.")
    guidance_scales: list[float] | None = Field(
        None, min_length=1, description="Sample every text-to-image item at each of these CFG scales (> 0); "
        "metrics per scale and their mean. None: the sampling's guidance_scale.")
    img2img: list[Img2ImgPrompt] = Field(default_factory=list, description="Image-to-image items.")

    @field_validator("guidance_scales")
    @classmethod
    def _positive_scales(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        bad = [g for g in v if not (g > 0 and math.isfinite(g))]
        if bad:
            raise ValueError(f"guidance scale {bad[0]} must be a finite number > 0 (1 turns classifier-free "
                             "guidance off; 5-10 is usual)")
        return distinct(v, "guidance_scales")

    @field_validator("natural", "new_setting", "no_concept", "trigger_test", "img2img", mode="before")
    @classmethod
    def _strings_to_prompts(cls, v: object) -> object:
        return [_as_prompt(x) for x in v] if isinstance(v, list) else v

    @field_validator("no_concept")
    @classmethod
    def _no_trigger(cls, v: list[SuitePrompt]) -> list[SuitePrompt]:
        for p in v:
            if "{trigger}" in p.prompt:
                raise ValueError(f"no-concept prompt {p.prompt!r} contains {{trigger}}: these "
                                 "prompts check that the base model's other knowledge survives")
        return v

    @field_validator("trigger_test")
    @classmethod
    def _has_trigger(cls, v: list[SuitePrompt]) -> list[SuitePrompt]:
        for p in v:
            if "{trigger}" not in p.prompt:
                raise ValueError(f"trigger-test prompt {p.prompt!r} lacks {{trigger}}: it is "
                                 "sampled with and without the trigger word")
        return v

    def model_post_init(self, _ctx) -> None:
        if not (self.natural or self.new_setting or self.no_concept or self.trigger_test):
            raise ValueError("the suite has no prompts to sample from text: give at least one of natural, "
                             "new_setting, no_concept, trigger_test (img2img items come beside them)")


# The documented default suite (also shipped as examples/suites/default.yaml): a few prompts
# of each kind at two seeds, 18 images in all. Needs a trigger word and a class word.
DEFAULT_SUITE: dict = {
    "name": "default",
    "seeds": [0, 1],
    "natural": ["a photo of {trigger} {class}", "{trigger} {class}, close-up, natural light"],
    "new_setting": ["{trigger} {class} on a beach at sunset", "{trigger} {class} in a snowy forest",
                    "a watercolor painting of {trigger} {class}"],
    "no_concept": ["a photo of a city street at night", "a bowl of fruit on a wooden table"],
    "trigger_test": ["a photo of {trigger} {class}"],
}


def _format_errors(err: ValidationError | ValueError, source: str) -> str:
    if not isinstance(err, ValidationError):
        return f"{source}: {err}"
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key (known: {sorted(PromptSuite.model_fields)})"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def parse_suite(data: object, source: str = "<suite>") -> PromptSuite:
    """Validate a suite mapping; every problem is reported at once as `source: key: problem`."""
    if not isinstance(data, dict):
        raise SuiteError(f"{source}: a suite must be a mapping with keys like natural, "
                         f"new_setting, no_concept, trigger_test; got {type(data).__name__}")
    try:
        return PromptSuite.model_validate(data)
    except (ValidationError, ValueError) as err:
        raise SuiteError(_format_errors(err, source)) from None


def load_suite(path: str | Path) -> PromptSuite:
    """Read and validate a suite YAML file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SuiteError(f"{path}: suite file not found")
    try:
        data = read_yaml(path)
    except YamlFileError as err:
        raise SuiteError(str(err)) from None
    return resolve_init_images(parse_suite(data, str(path)), path.parent)


def resolve_init_images(suite: PromptSuite, folder: str | Path) -> PromptSuite:
    """The suite with every relative `img2img[].init_image` made absolute against `folder`."""
    if not suite.img2img:
        return suite
    items = [p.model_copy(update={"init_image": str((Path(folder) / Path(p.init_image).expanduser()).resolve())})
             for p in suite.img2img]
    return suite.model_copy(update={"img2img": items})


def default_suite() -> PromptSuite:
    return parse_suite(DEFAULT_SUITE, "<default suite>")


def _tidy(text: str) -> str:
    """Clean up after removing a word: doubled spaces, stray or doubled commas."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip(" ,")


def drop_word(text: str, word: str) -> str:
    """`text` without the whole word `word` (and a comma right after it)."""
    return _tidy(re.sub(rf"(?<!\w){re.escape(word)}(?!\w)\s*,?", " ", text))


def _fill(template: str, trigger: str | None, class_word: str | None, where: str) -> str:
    if "{trigger}" in template and not trigger:
        raise SuiteError(f"{where}: prompt {template!r} uses {{trigger}} but no trigger word was "
                         "given (set trigger_word in the sweep spec)")
    if "{class}" in template and not class_word:
        raise SuiteError(f"{where}: prompt {template!r} uses {{class}} but no class word was "
                         "given (set eval.class_word in the sweep spec, e.g. 'dog' or 'outfit')")
    return _tidy(template.replace("{trigger}", trigger or "").replace("{class}", class_word or ""))


def expand_suite(suite: PromptSuite, trigger: str | None, class_word: str | None
                 ) -> list[SuiteItem]:
    """Every (kind, prompt, seed) to sample, in a fixed order: kinds as in `KINDS`, then
    prompts as listed, then seeds as listed. The trigger test's off prompt is its template with
    `{trigger}` removed; its items follow the on items in the same order."""
    items: list[SuiteItem] = []
    for kind in PROMPT_KINDS:
        for i, p in enumerate(getattr(suite, kind)):
            text = _fill(p.prompt, trigger, class_word, f"{suite.name}: {kind}[{i}]")
            items += [SuiteItem(kind, text, s) for s in p.seeds or suite.seeds]
    on, off = [], []
    for i, p in enumerate(suite.trigger_test):
        where = f"{suite.name}: trigger_test[{i}]"
        with_t = _fill(p.prompt, trigger, class_word, where)
        without = _fill(p.prompt.replace("{trigger}", ""), trigger, class_word, where)
        for s in p.seeds or suite.seeds:
            on.append(SuiteItem("trigger_on", with_t, s))
            off.append(SuiteItem("trigger_off", without, s))
    return items + on + off


def expand_img2img(suite: PromptSuite, trigger: str | None, class_word: str | None) -> list[Img2ImgItem]:
    """Every img2img (prompt, init image, strength, seed), prompts as listed, then strengths, then seeds."""
    items = []
    for i, p in enumerate(suite.img2img):
        text = _fill(p.prompt, trigger, class_word, f"{suite.name}: img2img[{i}]")
        items += [Img2ImgItem(text, p.init_image, st, s) for st in p.strengths for s in p.seeds or suite.seeds]
    return items


def clip_text(prompt: str, trigger: str | None, keep_trigger: bool = False) -> str:
    """The text an image made from `prompt` is scored against (see the module docstring)."""
    return prompt if keep_trigger or not trigger else drop_word(prompt, trigger)


def clip_texts(items: list[SuiteItem], trigger: str | None, keep_trigger: bool = False
               ) -> list[str]:
    return [clip_text(it.prompt, trigger, keep_trigger) for it in items]


def check_items(items: list, n_images: int) -> None:
    """Raise unless `items` are valid suite items, one per image."""
    if len(items) == 0:
        raise ValueError("the expanded suite has no items")
    if len(items) != n_images:
        raise ValueError(f"need one image per suite item: got {n_images} images "
                         f"for {len(items)} items (kind, prompt, seed)")
    for i, it in enumerate(items):
        if it[0] not in KINDS:
            raise ValueError(f"items[{i}]: unknown kind {it[0]!r}; known: {list(KINDS)}")
