"""`python -m trainer caption DATASET --trigger WORD [--model ID_OR_PATH] [--template T]
[--overwrite] [--batch-size N]`: BLIP captions for the dataset's images that have none.

kohya folders get a `.txt` beside each image; an imagefolder (or a folder of uncaptioned images)
gets `metadata.jsonl`. Exit status: 0 when done, 1 when some image was unreadable (the others are
captioned, the unreadable ones named), 2 for bad arguments (named, before any model is loaded).
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from trainer.captioning import DEFAULT_CAPTION_MODEL, DEFAULT_TEMPLATE, CaptionConfig
from trainer.config import validation_problems

EXIT_BAD_ARGS = 2
# Each input's name in messages: the argument a user typed.
NAMES = {"model": "--model", "template": "--template", "batch_size": "--batch-size", "trigger": "--trigger",
         "dataset": "DATASET"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer caption", description="Caption a dataset's images with BLIP.")
    p.add_argument("dataset", help="kohya folder (<repeats>_<name>/ subfolders), imagefolder, or a folder of images")
    p.add_argument("--trigger", required=True, help="trigger word written into every caption ({trigger})")
    p.add_argument("--model", default=DEFAULT_CAPTION_MODEL, help="BLIP hub id or local save_pretrained folder "
                   f"(default {DEFAULT_CAPTION_MODEL})")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"caption template (default {DEFAULT_TEMPLATE!r})")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    p.add_argument("--batch-size", type=int, default=8, help="images per BLIP forward pass (default 8)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = CaptionConfig(model=args.model, template=args.template, overwrite=args.overwrite,
                               batch_size=args.batch_size)
    except ValidationError as err:
        problems = validation_problems(err)
    else:
        from trainer.dataset_captions import caption_input_problems

        problems = caption_input_problems(args.dataset, args.trigger, config)
    if problems:
        print("cannot caption:", *(f"  {NAMES.get(key, key)}: {msg}" for key, msg in problems), sep="\n", file=sys.stderr)
        return EXIT_BAD_ARGS
    from trainer.dataset_captions import caption_dataset

    report = caption_dataset(args.dataset, args.trigger, config)
    print(report.summary())
    return 1 if report.unreadable else 0
