"""The evaluator service's body, without Ray: one CLIP model (and the optional judges beside it,
`evaluator.judges`), a request batcher, caches of text embeddings and of reference-image
embeddings. `evaluator.remote` runs it as a Ray actor; tests can drive it with asyncio alone.

Each request is a coroutine; images of concurrent requests share model forwards
(`evaluator.batching`); prompts repeat at every evaluation, so their embeddings are cached
(LRU); reference images (training images, base-model images) are embedded once per key.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from evaluator.batching import ImageBatcher
from evaluator.defaults import TORCHMETRICS_SCALE
from evaluator.image_checks import validate_images
from evaluator.suites import SuiteItem, check_items, clip_texts

_TEXT_CACHE = 4096  # text embeddings kept


class MissingReference(LookupError):
    """A reference key that the service has not cached (never put, or the service restarted)."""


class EvaluatorService:
    """The service's body; `evaluator.remote` makes it a Ray actor. Async: each request is a
    coroutine; the model runs in one worker thread, fed by `ImageBatcher`."""

    def __init__(self, name: str, model: str, pretrained: str | None, device: str | None,
                 max_batch_size: int, max_wait_ms: float, torch_threads: int,
                 dino: str | None = None, aesthetic: str | None = None):
        import torch

        from evaluator.clip_model import ClipModel
        from evaluator.judges import Judges

        torch.set_num_threads(torch_threads)
        self.name = name
        self.config = {"model": model, "pretrained": pretrained, "dino": dino, "aesthetic": aesthetic}
        self.clip = ClipModel.load(model, pretrained, device=device)
        self.judges = Judges.load(dino, aesthetic, self.clip)
        self.model_loads = 1
        self.embed_dim = int(self.clip.embed_texts(["x"]).shape[1])
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip")
        self.batcher = ImageBatcher(self._embed_batch, max_batch_size, max_wait_ms, self.executor)
        self.references: dict[str, np.ndarray] = {}
        self.dino_references: dict[str, np.ndarray] = {}  # with a DINO judge: the same keys, DINO embeddings
        self.texts: OrderedDict[str, np.ndarray] = OrderedDict()
        self.counts = {"reference_hits": 0, "reference_misses": 0, "text_hits": 0,
                       "text_misses": 0, "score_calls": 0, "suite_calls": 0, "ground_truth_calls": 0}

    def _embed_batch(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [e.numpy() for e in self.clip.embed_image_list(arrays)]

    def _embed_texts_sync(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.texts]
        self.counts["text_hits"] += len(set(texts)) - len(missing)
        self.counts["text_misses"] += len(missing)
        if missing:
            for t, e in zip(missing, self.clip.embed_texts(missing).numpy()):
                self.texts[t] = e
        for t in texts:
            self.texts.move_to_end(t)
        out = np.stack([self.texts[t] for t in texts])
        while len(self.texts) > _TEXT_CACHE:
            self.texts.popitem(last=False)
        return out

    async def _embed_images(self, images: np.ndarray) -> np.ndarray:
        validate_images(images)
        # Arguments from the object store are read-only views; torch wants writable memory.
        return await self.batcher.embed(np.array(images))

    async def _embed_texts(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._embed_texts_sync, texts)

    async def info(self) -> dict:
        return {"name": self.name, **self.config, "pid": os.getpid(),
                "embed_dim": self.embed_dim}

    async def score(self, images: np.ndarray, prompts: list[str],
                    scale: float = TORCHMETRICS_SCALE) -> dict:
        from evaluator.metrics import clip_t

        _check_prompts(images, prompts)
        self.counts["score_calls"] += 1
        img, txt = await asyncio.gather(self._embed_images(images), self._embed_texts(prompts))
        per_image = clip_t(img, txt, scale=scale)
        return {"clip_score": float(per_image.mean()), "per_image": [float(s) for s in per_image]}

    async def embed(self, images: np.ndarray) -> np.ndarray:
        return await self._embed_images(images)

    async def put_reference(self, key: str, images: np.ndarray) -> int:
        if key in self.references:
            self.counts["reference_hits"] += 1
        else:
            self.counts["reference_misses"] += 1
            images = np.array(images)  # writable, for torch
            if self.judges is not None and self.judges.dino is not None:
                # Every reference, base-model ones too: the service does not know which key is the
                # training images, and DINO over a suite's few no_concept images once costs little.
                loop = asyncio.get_running_loop()
                emb = await loop.run_in_executor(self.executor, self.judges.reference, images)
                self.dino_references[key] = emb.numpy()
            self.references[key] = await self._embed_images(images)
        return len(self.references[key])

    async def reference_size(self, key: str) -> int:
        """Cached embeddings under `key` (a hit), or 0 (a miss, to be put)."""
        if key not in self.references:
            return 0
        self.counts["reference_hits"] += 1
        return len(self.references[key])

    def _reference(self, key: str | None, what: str) -> np.ndarray | None:
        if key is None:
            return None
        if key not in self.references:
            raise MissingReference(f"{what} reference {key!r} is not in evaluator {self.name!r}'s "
                                   "cache (never put, or the service restarted): call "
                                   "put_reference first")
        self.counts["reference_hits"] += 1
        return self.references[key]

    async def score_suite(self, items: list, images: np.ndarray, trigger: str | None = None,
                          base_key: str | None = None, train_key: str | None = None,
                          weights: dict | None = None, keep_trigger: bool = False,
                          scale: float = TORCHMETRICS_SCALE) -> dict:
        import torch

        from evaluator.score import suite_metrics

        validate_images(images)
        items = [SuiteItem(*it) for it in items]
        check_items(items, len(images))
        base = self._reference(base_key, "base-model")
        train = self._reference(train_key, "training")
        self.counts["suite_calls"] += 1
        img, txt = await asyncio.gather(self._embed_images(images),
                                        self._embed_texts(clip_texts(items, trigger, keep_trigger)))
        as_t = (lambda a: None if a is None else torch.from_numpy(a))
        judged = None
        if self.judges is not None:
            train_dino = as_t(self.dino_references.get(train_key)) if train_key else None
            loop = asyncio.get_running_loop()
            # Judges.inputs indexes the concept images out (a writable copy of the read-only argument).
            judged = await loop.run_in_executor(self.executor, self.judges.inputs, items, images,
                                                torch.from_numpy(img), train_dino)
        return suite_metrics(items, torch.from_numpy(img), torch.from_numpy(txt), as_t(base),
                             as_t(train), weights, scale, judged)

    async def score_ground_truth(self, images: np.ndarray, captions: list[str], truth_key: str) -> dict:
        """gt_fd, gt_kid, gt_cmmd and gt_clip_t (evaluator.ground_truth.clip_ground_truth_scores) of image
        i against the truth images put under `truth_key` and caption i, on this service's CLIP features."""
        from evaluator.ground_truth import clip_ground_truth_scores

        _check_prompts(images, captions)
        truth = self._reference(truth_key, "ground-truth")
        if len(truth) != len(images):
            raise ValueError(f"ground truth {truth_key!r} holds {len(truth)} images, got {len(images)} generated: "
                             "one generated image per truth image")
        self.counts["ground_truth_calls"] += 1
        img, txt = await asyncio.gather(self._embed_images(images), self._embed_texts(list(captions)))
        # FD's matrix square root takes a while at a real CLIP's width: off the event loop and the CLIP thread.
        return await asyncio.to_thread(clip_ground_truth_scores, img, truth, txt)

    async def stats(self) -> dict:
        b = self.batcher.stats
        return {"model_loads": self.model_loads, "batches": b.batches,
                "batch_sizes": list(b.batch_sizes), "requests": b.requests, "images": b.images,
                "references": sorted(self.references), **self.counts}


def _check_prompts(images: np.ndarray, prompts: list[str]) -> None:
    validate_images(images)
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of strings (one per image), "
                        f"got {type(prompts).__name__}")
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image: got {len(images)} images "
                         f"and {len(prompts)} prompts")
