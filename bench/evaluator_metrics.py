"""Cost of the distribution metrics per evaluation: cmmd, clip_fd, clip_kid, diversity and
`concept_distribution` (all four, what `suite_metrics` adds to every evaluation), from embeddings.

Sizes of the demo's suite (examples/suites/demo.yaml): 24 concept images (5 prompts x 4 seeds, and
the trigger prompt x 4 seeds, which repeats the first natural prompt: 20 distinct) against the 18
training images. Embedded by the built-in tiny CLIP from toy-world pictures (cyan shapes for the
training images and a LoRA that learnt the concept; known colours for one that did not), then
random unit vectors of the same counts at larger widths (512: ViT-B; 768: ViT-L, the default
evaluator) for scale. Each timing is the median of `--repeats` calls; the first call of the
process (which imports torchmetrics) is reported apart.

    .venv/bin/python bench/evaluator_metrics.py [--repeats 21] [--threads 1] [--dims 512 768]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_PROMPTS, N_SEEDS, N_TRAIN = 5, 4, 18


def demo_keys() -> list[tuple[str, int]]:
    """(prompt, seed) of the demo's concept items: 5 prompts x 4 seeds, then the trigger test's repeat of prompt 0."""
    return [(f"p{i // N_SEEDS}", i % N_SEEDS) for i in range(N_PROMPTS * N_SEEDS)] + [("p0", s) for s in range(N_SEEDS)]


def with_repeat(distinct):
    """The 20 distinct concept rows and the 4 the trigger test draws again (the same images)."""
    import torch

    return torch.cat([distinct, distinct[:N_SEEDS]])


def timed(repeats: int, fn, *fn_args) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*fn_args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dims", type=int, nargs="*", default=[512, 768], help="widths of the random-embedding rows")
    args = p.parse_args()

    import numpy as np
    import torch

    from evaluator import TINY_CLIP_ID, ClipModel
    from evaluator.distribution_metrics import clip_fd, clip_kid, cmmd, concept_distribution, diversity
    from toyworld.lora_task import concept_images, prior_images

    torch.set_num_threads(args.threads)
    clip = ClipModel.load(TINY_CLIP_ID, None, device="cpu")
    train = clip.embed_images(np.stack(concept_images(N_TRAIN, seed=0)[0]))
    learnt = with_repeat(clip.embed_images(np.stack(concept_images(N_PROMPTS * N_SEEDS, seed=1)[0])))
    missed = with_repeat(clip.embed_images(np.stack(prior_images(N_PROMPTS * N_SEEDS, seed=1)[0])))
    keys = demo_keys()
    prompts = [k for k, _ in keys]

    start = time.perf_counter()
    concept_distribution(learnt, keys, train)
    first = (time.perf_counter() - start) * 1000

    print(f"{len(keys)} concept images ({len(set(keys))} distinct) vs {N_TRAIN} training images, "
          f"{args.threads} thread(s), median of {args.repeats}; first call of the process {first:.0f} ms")
    # No diversity here: the pictures are grouped into "prompts" by position, not drawn per prompt.
    print("values (tiny CLIP):       cmmd  cmmd(V-stat)  clip_fd  clip_kid")
    for name, gen in (("concept learnt", learnt), ("concept missed", missed)):
        out = concept_distribution(gen, keys, train)
        distinct = gen[:N_PROMPTS * N_SEEDS]
        print(f"  {name:<20} {out['cmmd']:8.3f} {cmmd(distinct, train, unbiased=False):12.3f} {out['clip_fd']:8.4f} "
              f"{out['clip_kid']:9.5f}")
    print("\n| embeddings | d | cmmd | clip_fd | clip_kid | diversity | concept_distribution (all four) |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    sets = [("tiny CLIP (toy world)", learnt, train)] + [
        ("random unit vectors", with_repeat(torch.randn(N_PROMPTS * N_SEEDS, d, generator=g)),
         torch.randn(N_TRAIN, d, generator=g)) for d in args.dims]
    for label, gen, ref in sets:
        distinct = gen[:N_PROMPTS * N_SEEDS]
        ms = [timed(args.repeats, f, distinct, ref) for f in (cmmd, clip_fd, clip_kid)]
        ms.append(timed(args.repeats, diversity, distinct, prompts[:len(distinct)]))
        ms.append(timed(args.repeats, concept_distribution, gen, keys, ref))
        print(f"| {label} | {gen.shape[1]} | " + " | ".join(f"{m:.2f}" for m in ms) + " |")


if __name__ == "__main__":
    main()
