"""Reading a sweep spec: YAML file, `--set` overrides, schema, then every check, all at once.

Each problem comes back as one `path: message` line with what to do, in one SpecError, before
any model is built or Ray starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from common.overrides import apply_overrides
from common.yaml_files import YamlFileError, read_yaml
from sweeps.spec_checks import cross_problems, space_problems, train_problems
from sweeps.spec_schema import SweepSpec
from trainer.config import format_validation_error


class SpecError(ValueError):
    """An unusable sweep spec; `problems` holds one `path: message` line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__(f"{source}: {len(problems)} problem(s) in the sweep spec:\n  " + "\n  ".join(problems))


def key_problem(key: str, check: Callable[[], object], error: type[Exception]) -> list[str]:
    """`["<key>: <message>"]` when `check()` raises `error` (an input problem whose message names the
    fix), else []: each input is checked on its own, so that every problem is reported at once."""
    try:
        check()
    except error as err:
        return [f"{key}: {err}"]
    return []


def parse_spec(data: dict, source: str = "<spec>") -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError(source, ["(top level): expected a mapping of keys such as name, base_model, dataset, space"])
    problems: list[str] = []
    try:
        spec = SweepSpec(**data)
    except ValidationError as err:
        problems += format_validation_error(err)
        # Still check the space and the training values, so every problem is reported at once.
        spec = SweepSpec.model_construct(**data)
        if not all(isinstance(getattr(spec, k, None), dict) for k in ("train", "space")):
            raise SpecError(source, problems) from None
    problems += space_problems(spec) + train_problems(spec) + cross_problems(spec)
    if problems:
        raise SpecError(source, problems)
    return spec


def load_spec(path: str | Path, overrides: list[str] = ()) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), ["file not found; pass --space pointing at a sweep YAML such as examples/demo.yaml"])
    try:
        data = read_yaml(path) or {}
    except YamlFileError as err:
        raise SpecError(str(path), [str(err)]) from None
    if isinstance(data, dict):
        problems = apply_overrides(data, list(overrides))
        if problems:
            raise SpecError("--set", problems)
        suite = data["eval"].get("suite") if isinstance(data.get("eval"), dict) else None
        if isinstance(suite, str) and not Path(suite).expanduser().is_absolute():
            # A suite path is relative to the spec file, so the spec works from any folder.
            data["eval"]["suite"] = str((path.parent / suite).resolve())
        if isinstance(suite, dict):  # so are the init images of a suite inline in the spec
            _resolve_init_images(suite, path.parent)
    return parse_spec(data, str(path))


def _resolve_init_images(suite: dict, folder: Path) -> None:
    """Each relative `img2img[].init_image` of a raw suite mapping made absolute against `folder`;
    anything malformed is left for the suite's validation to report."""
    for entry in suite.get("img2img") or []:
        image = entry.get("init_image") if isinstance(entry, dict) else None
        if isinstance(image, str) and image and not Path(image).expanduser().is_absolute():
            entry["init_image"] = str((folder / image).resolve())
