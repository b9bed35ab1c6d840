"""python sweeps/pull.py SOURCE --to PATH [--rank K] [--format kohya|diffusers]

SOURCE: a sweep folder, a sweep URI (s3://bucket/sweeps/<name>), or a W&B artifact reference
`wandb:entity/project/lora-<sweep>:best`. The file's sha256 is checked against the export
manifest before and after the copy; what was pulled (params, scores) is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

WANDB_PREFIX = "wandb:"


class PullError(ValueError):
    """A source that cannot be pulled from; the message says what to do."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fetch an exported LoRA of a sweep, checking its sha256.")
    p.add_argument("source", help="sweep folder or URI, or wandb:entity/project/artifact:alias")
    p.add_argument("--to", required=True, help="destination file (or an existing folder)")
    p.add_argument("--rank", type=int, default=1, help="which of the exported LoRAs (1 = the winner)")
    p.add_argument("--format", choices=["kohya", "diffusers"], default=None,
                   help="file layout; default kohya (loads in diffusers, AUTOMATIC1111 and ComfyUI) when exported")
    return p.parse_args(argv)


def pull(source: str, to: str | Path, rank: int = 1, fmt: str | None = None) -> tuple[Path, dict]:
    """Copy the rank-`rank` LoRA of `source` to `to` after checking its sha256; returns (path, info)."""
    if source.startswith(WANDB_PREFIX):
        with tempfile.TemporaryDirectory() as tmp:
            return _pull_from(_download_artifact(source[len(WANDB_PREFIX):], Path(tmp)), to, rank, fmt)
    return _pull_from(source, to, rank, fmt)


def _pull_from(root: str | Path, to: str | Path, rank: int, fmt: str | None) -> tuple[Path, dict]:
    from sweeps import storage
    from sweeps.export import read_manifest, verify_files

    manifest = read_manifest(str(root))
    entries = {e["rank"]: e for e in manifest["entries"]}
    if rank not in entries:
        raise PullError(f"{root}: --rank {rank} was not exported (ranks {sorted(entries)}); "
                        "raise export.top_k and run --export-only")
    entry = entries[rank]
    layouts = {k: v for k, v in entry["files"].items() if k in ("kohya", "diffusers")}
    fmt = fmt or ("kohya" if "kohya" in layouts else "diffusers")
    if fmt not in layouts:
        raise PullError(f"{root}: rank {rank} has no {fmt} file (exported: {sorted(layouts)}); add it to export.formats")
    rel = layouts[fmt]
    verify_files(str(root), manifest, [rel, entry["files"]["info"]])
    dst = Path(to).expanduser()
    if dst.is_dir():
        dst = dst / f"{manifest['sweep']}-rank{rank}-{fmt}.safetensors"
    storage.copy_file(storage.join(str(root), rel), dst)
    if storage.sha256_file(dst) != manifest["sha256"][rel]:
        dst.unlink(missing_ok=True)
        raise PullError(f"{dst}: the copy does not match the manifest's sha256; it was removed, try again")
    _check_safetensors(dst)
    info = json.loads(storage.read_text(storage.join(str(root), entry["files"]["info"])))
    storage.write_text(dst.with_suffix(".json"), json.dumps(info | {"format": fmt, "sha256": manifest["sha256"][rel]},
                                                            indent=2, default=str))
    return dst, info


def _check_safetensors(path: Path) -> None:
    """Open the header only (safetensors: no code runs on load)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if not list(f.keys()):
                raise PullError(f"{path}: holds no tensors")
    except PullError:
        raise
    except Exception as err:
        path.unlink(missing_ok=True)
        raise PullError(f"{path}: not a readable safetensors file ({err}); it was removed") from None


def _download_artifact(ref: str, into: Path) -> Path:
    """The artifact's files (a sweep-folder subset: export/manifest.json, export/rank1/...) in `into`."""
    import os

    parts = ref.split("/")
    if len(parts) != 3 or ":" not in parts[2] or not all(parts):
        raise PullError(f"wandb:{ref}: expected wandb:ENTITY/PROJECT/lora-<sweep>:ALIAS, e.g. wandb:me/lorasweep/lora-demo:best")
    if not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        raise PullError(f"wandb:{ref}: downloading an artifact needs W&B online: set WANDB_API_KEY (and not "
                        "WANDB_MODE=offline); offline runs must first be uploaded with `wandb sync`")
    import wandb

    try:
        artifact = wandb.Api().artifact(ref, type="model")
        return Path(artifact.download(root=str(into)))
    except Exception as err:  # wandb raises CommError / ValueError for unknown refs or no network
        raise PullError(f"wandb:{ref}: download failed ({err})") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sweeps.storage import StorageError

    try:
        path, info = pull(args.source, args.to, args.rank, args.format)
    except (PullError, StorageError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"sweep {info['sweep']}, rank {info['rank']}, trial {info['trial_id']} at step {info.get('step')}")
    print("params: " + ", ".join(f"{k}={v}" for k, v in sorted(info["params"].items())))
    print("scores: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info["objectives"].items()))
    print(f"pulled: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
