"""`python -m evaluator` (no Ray):

    python -m evaluator score --images DIR --prompts FILE [--trigger W --class-word C]
        [--base-images DIR --train-images DIR] [--model M --pretrained P] [--json OUT]
    python -m evaluator items --suite FILE [--trigger W --class-word C]

FILE is a suite YAML or a text file of prompts, one per line for each image in sorted
file-name order (see `evaluator.folder`). `items` lists what a suite expands to, with the file
name each image should have so that sorted order matches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluator.defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="CLIP-score a folder of images")
    s.add_argument("--images", required=True, help="folder of images (sorted by file name)")
    s.add_argument("--prompts", required=True, help="suite YAML, or text file: one prompt a line")
    s.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"open_clip model or builtin:tiny-clip (default {DEFAULT_MODEL})")
    s.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                   help="pretrained tag or checkpoint path; 'none' for random/builtin weights")
    s.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    s.add_argument("--json", dest="json_out", default=None, help="write the results here")
    for sp in (s, sub.add_parser("items", help="list a suite's expanded items")):
        sp.add_argument("--trigger", default=None, help="fills {trigger}")
        sp.add_argument("--class-word", default=None, help="fills {class}")
    s.add_argument("--base-images", default=None, help="base-model images of the no_concept items")
    s.add_argument("--train-images", default=None, help="training images (for CLIP-I)")
    sub.choices["items"].add_argument("--suite", required=True, help="suite YAML")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "items":
            from evaluator.suites import expand_suite, load_suite

            items = expand_suite(load_suite(args.suite), args.trigger, args.class_word)
            for i, it in enumerate(items):
                print(f"{i:03d}_{it.kind}_s{it.seed}.png\t{it.kind}\t{it.seed}\t{it.prompt}")
            return 0
        from evaluator.clip_model import ClipModel
        from evaluator.folder import format_table, score_folder

        pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
        model = ClipModel.load(args.model, pretrained, device=args.device)
        result = score_folder(model, args.images, args.prompts, args.trigger, args.class_word,
                              args.base_images, args.train_images)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
