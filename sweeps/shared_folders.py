"""What the driver builds once and every node reads, kept in the sweep's storage when that is remote.

The latent/text caches (trainer.cache) and the class images of prior preservation are built by
the driver before any trial (sweeps.trial_plan). On one machine or on NFS every trial finds them
where they were built. With an object store (`s3://`) the driver publishes each folder to
`<sweep>/shared/<kind>/<name>/` once, and a trial on another node (or a new head after the old one
was lost) fetches the folders it lacks before it trains, instead of building them again:

  train_cache/<latents-…|text-…>   the cache folders of `Prepared.cache_folders`, under this node's
                                   cache folder (`train.cache_dir`, else <LORASWEEP_CACHE>/train_cache)
  class_images/                    `train.class_data_dir`, at the same path on every node

A folder's upload ends with its `.complete` marker: one without it is incomplete, never fetched,
and published again. The marker lists each file's mtime, which a fetch gives back to its copy: the
latent cache's key holds the mtimes of the images it encoded (class images among them), so class
images fetched with fresh mtimes would make a new head build and publish the latents again. A
fetch writes the folder whole (a temporary folder renamed) under a lock, so trials starting
together on one node download it once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from common.files import file_lock
from sweeps import storage
from sweeps.results import sweep_uri
from sweeps.spec_schema import SweepSpec
from sweeps.trial_plan import TrialPlan
from trainer.cache import cache_dir_for

SHARED = "shared"
TRAIN_CACHE = "train_cache"
CLASS_IMAGES = "class_images"
COMPLETE = ".complete"  # written last by publish
_SKIPPED = (".lock",)  # trainer.cache's lock file: node-local


@dataclass(frozen=True)
class SharedFolder:
    """One folder of `kind` named `name`; `path`: where it lies on every node, or None for a cache
    folder (under the node's own cache folder, `cache_dir_for(cache_dir)`)."""

    kind: str
    name: str
    path: str | None = None

    def local(self, cache_dir: str | None) -> Path:
        return Path(self.path) if self.path is not None else cache_dir_for(cache_dir) / self.name

    def uri(self, sweep_uri: str) -> str:
        return storage.join(sweep_uri, SHARED, self.kind, self.name)


def plan_folders(cache_folders: tuple[str, ...], fixed: dict) -> tuple[SharedFolder, ...]:
    """The shared folders of a plan: its cache folders and, with prior preservation, its class images."""
    folders = [SharedFolder(TRAIN_CACHE, Path(f).name) for f in cache_folders]
    if fixed.get("with_prior_preservation") and fixed.get("class_data_dir"):
        path = Path(fixed["class_data_dir"]).expanduser().resolve()
        folders.append(SharedFolder(CLASS_IMAGES, path.name, str(path)))
    return tuple(folders)


def publish(folders: tuple[SharedFolder, ...], sweep_uri: str, cache_dir: str | None) -> list[str]:
    """Upload each folder not yet complete in the storage; returns the names uploaded."""
    done = []
    for folder in folders:
        uri = folder.uri(sweep_uri)
        if storage.exists(storage.join(uri, COMPLETE)):
            continue
        local = folder.local(cache_dir)
        names = [n for n in (storage.list_files(local) if local.is_dir() else []) if Path(n).name not in _SKIPPED]
        for name in names:
            storage.copy_file(local / name, storage.join(uri, name))
        mtimes = {n: (local / n).stat().st_mtime_ns for n in names}
        storage.write_text(storage.join(uri, COMPLETE), json.dumps({"mtime_ns": mtimes}, sort_keys=True))
        done.append(f"{folder.kind}/{folder.name}")
    return done


def fetch(folders: tuple[SharedFolder, ...], sweep_uri: str, cache_dir: str | None) -> list[str]:
    """Download each folder this node lacks and the storage holds complete; returns the names fetched."""
    done = []
    for folder in folders:
        local = folder.local(cache_dir)
        if _present(local):
            continue
        uri = folder.uri(sweep_uri)
        if not storage.exists(storage.join(uri, COMPLETE)):
            continue  # not published (yet): the trainer builds it as without shared storage
        with file_lock(local.parent / f".{local.name}.fetch.lock"):
            if not _present(local):  # another trial on this node may have fetched it meanwhile
                storage.download_folder(uri, local, skip=(COMPLETE,))
                _restore_mtimes(local, storage.read_text(storage.join(uri, COMPLETE)))
                done.append(f"{folder.kind}/{folder.name}")
    return done


def prefetch(spec: SweepSpec) -> list[str]:
    """On the driver before it prepares (a new head): every cache folder the sweep's storage holds,
    and the class images, so that preparing finds them instead of building them again."""
    if not spec.is_remote:
        return []
    uri, cache_dir = sweep_uri(spec), spec.train.get("cache_dir")
    folders = [SharedFolder(TRAIN_CACHE, n) for n in storage.listdir(storage.join(uri, SHARED, TRAIN_CACHE))]
    folders += plan_folders((), spec.train)
    return fetch(tuple(folders), uri, cache_dir)


def share_plan(spec: SweepSpec, plan: TrialPlan) -> TrialPlan:
    """With remote storage: publish the plan's folders and name them in the plan (trials fetch them)."""
    if not spec.is_remote:
        return plan
    folders = plan_folders(plan.prepared.cache_folders, plan.fixed)
    published = publish(folders, plan.sweep_uri, plan.fixed.get("cache_dir"))
    if published:
        print(f"sweep {spec.name}: published to {plan.sweep_uri}/{SHARED}: {', '.join(published)}", flush=True)
    return replace(plan, shared=folders)


def _restore_mtimes(local: Path, marker: str) -> None:
    """Give the fetched files the mtimes the publisher's files had (a marker of an older lorasweep is empty)."""
    for name, mtime_ns in (json.loads(marker).get("mtime_ns", {}) if marker.strip() else {}).items():
        path = local / name
        if path.is_file():
            os.utime(path, ns=(mtime_ns, mtime_ns))


def _present(local: Path) -> bool:
    return local.is_dir() and any(p.name not in _SKIPPED for p in local.iterdir())
