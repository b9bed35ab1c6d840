"""Train one LoRA: `python -m trainer --config train.yaml [--set key=value ...] [--output DIR]
[--format kohya|diffusers|both] [--resume]`; `python -m trainer --fields` lists the config fields;
`python -m trainer caption DATASET --trigger WORD ...` captions a dataset (trainer.caption_cli).

The YAML holds TrainConfig fields at the top level plus an optional `output:` section (dir,
name, format, scale). `--set` overrides any key by its dotted path (`--set sampling.steps=4`),
the value read as YAML. Every config problem is printed with its key, and the exit status is 2,
before any model is loaded. The last line printed is the path of the exported LoRA.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.overrides import apply_overrides
from common.yaml_files import YamlFileError, read_yaml
from trainer.captioning import CaptionConfig
from trainer.config import TrainConfig, describe_fields, format_validation_error, train_config_problems

EXIT_CONFIG = 2
CHECKPOINTS = "checkpoints"


class OutputOptions(BaseModel):
    """Where and how the trained LoRA is written."""

    model_config = ConfigDict(extra="forbid")

    dir: str = Field("runs/train", description="Output folder (created).")
    name: str = Field("lora", min_length=1, description="File stem and ss_output_name of the LoRA.")
    format: Literal["kohya", "diffusers", "both"] = Field(
        "kohya", description="kohya: A1111/ComfyUI/diffusers-loadable; diffusers: pytorch_lora_weights layout. "
        "method full: kohya = <name>.safetensors, one single-file (LDM) checkpoint; diffusers = a diffusers/ folder."
    )
    scale: float = Field(1.0, gt=0, description="Strength baked into the kohya file (up weights x scale).")


class ConfigProblems(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def read_run_config(path: str, sets: list[str], output_dir: str | None,
                    fmt: str | None) -> tuple[TrainConfig, OutputOptions, CaptionConfig | None]:
    """Validated training config, output options and caption settings (None: no `caption:`
    section), or ConfigProblems listing every problem."""
    try:
        values = read_yaml(path) or {}
    except YamlFileError as err:
        raise ConfigProblems([str(err)]) from None
    if not isinstance(values, dict):
        raise ConfigProblems([f"{path}: the top level must be a mapping of config keys"])
    problems = apply_overrides(values, sets)
    out_values = values.pop("output", None) or {}
    if not isinstance(out_values, dict):
        problems.append("output: must be a mapping (dir, name, format, scale)")
        out_values = {}
    out_values.update({k: v for k, v in (("dir", output_dir), ("format", fmt)) if v is not None})
    caption, caption_problems = _caption_section(values.pop("caption", None))
    problems += caption_problems
    cfg = options = None
    config_problems = train_config_problems(values)
    problems += [f"{path or '(top level)'}: {msg}" for path, msg in config_problems]
    if not config_problems:
        cfg = TrainConfig(**values)
    try:
        options = OutputOptions(**out_values)
    except ValidationError as err:
        problems += format_validation_error(err, prefix="output")
    if options and options.scale != 1.0 and options.format == "diffusers":
        problems.append("output.scale: only the kohya layout bakes a scale in; use format kohya or both")
    if cfg and caption:
        from trainer.dataset_captions import caption_settings_problems

        problems += [f"{key}: {msg}" for key, msg in caption_settings_problems(cfg, caption)]
    if problems:
        raise ConfigProblems(problems)
    return cfg, options, caption


def _caption_section(values) -> tuple[CaptionConfig | None, list[str]]:
    if values is None:
        return None, []
    if not isinstance(values, dict):
        return None, ["caption: must be a mapping (model, template, overwrite, batch_size), e.g. caption: {}"]
    try:
        return CaptionConfig(**values), []
    except ValidationError as err:
        return None, format_validation_error(err, prefix="caption")


def check_paths(cfg: TrainConfig, caption: CaptionConfig | None = None) -> list[str]:
    """Problems with the dataset, base model, class folder and captioning model paths, found
    without loading any model."""
    from trainer.class_images import class_dir_problems
    from trainer.dataset_captions import caption_input_problems
    from trainer.dataset_layouts import DatasetError, detect_dataset_type
    from trainer.model_loading import BaseModelError, resolve_base_model
    from trainer.train_data import resolve_dataset

    problems = []
    try:
        detect_dataset_type(resolve_dataset(cfg.dataset))
    except DatasetError as err:
        problems.append(f"dataset: {err}")
    try:
        resolve_base_model(cfg.base_model)
    except BaseModelError as err:
        problems.append(f"base_model: {err}")
    if caption and not problems:  # the dataset's layout and the captioning model
        names = {"model": "caption.model", "trigger": "trigger_word"}
        problems += [f"{names.get(key, key)}: {msg}"
                     for key, msg in caption_input_problems(resolve_dataset(cfg.dataset), cfg.trigger_word, caption)]
    return problems + [f"class_data_dir: {msg}" for msg in class_dir_problems(cfg)]


def latest_checkpoint(folder: Path) -> Path | None:
    from trainer.checkpoint import META_FILE

    done = [p for p in folder.glob("step-*") if (p / META_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.removeprefix("step-")), default=None)


def train_and_export(cfg: TrainConfig, options: OutputOptions, resume: bool = False) -> list[Path]:
    """Prepare (data, caches, hashes), train (resuming from the latest checkpoint when asked),
    checkpoint, export; the files written."""
    from tqdm import tqdm

    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.loop import LoraTrainer
    from trainer.model_loading import load_sd_components
    from trainer.preparation import prepare

    out = Path(options.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(cfg.model_dump_json(indent=2), encoding="utf-8")
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    models = load_sd_components(cfg.base_model)
    prepared = prepare(cfg, components=models)
    trainer = LoraTrainer.build(cfg, components=models, prepared=prepared)
    ckpt_root = out / CHECKPOINTS
    if resume and (last := latest_checkpoint(ckpt_root)) is not None:
        load_checkpoint(trainer, last)
        print(f"resumed from {last} at step {trainer.global_step}", file=sys.stderr)
    interval = cfg.checkpoint_interval  # 0: only at the end
    bar = tqdm(total=trainer.max_train_steps, initial=trainer.global_step, unit="step", desc=options.name)

    def on_step(metrics: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if interval and metrics["step"] % interval == 0 and metrics["step"] < trainer.max_train_steps:
            save_checkpoint(trainer, ckpt_root / f"step-{metrics['step']}")

    try:
        trainer.train(callback=on_step)
    finally:
        bar.close()
    save_checkpoint(trainer, ckpt_root / f"step-{trainer.global_step}")
    if cfg.method == "full":  # a whole model: <name>.safetensors (single file, UIs) and diffusers/ (a pipeline folder)
        return _export_full(trainer, out, options)
    with trainer.eval_weights():  # the EMA's LoRA when on
        return _export_lora(trainer, cfg, prepared, out, options, started)


def _export_full(trainer, out: Path, options: OutputOptions) -> list[Path]:
    from trainer.full_export import export_trainer

    folder = out / "diffusers" if options.format in ("diffusers", "both") else None
    single = out / f"{options.name}.safetensors" if options.format in ("kohya", "both") else None
    export_trainer(trainer, folder, single, metadata={"lorasweep_step": str(trainer.global_step)})
    return [p for p in (folder, single) if p is not None]


def _export_lora(trainer, cfg: TrainConfig, prepared, out: Path, options: OutputOptions, started: str) -> list[Path]:
    from trainer.export import kohya_metadata, save_lora_diffusers, save_lora_kohya

    te = trainer.models.text_encoder if cfg.train_text_encoder else None
    written = []
    if options.format in ("diffusers", "both"):
        written.append(save_lora_diffusers(trainer.models.unet, out / "diffusers" / "pytorch_lora_weights.safetensors", te))
    if options.format in ("kohya", "both"):
        meta = kohya_metadata(cfg, prepared, steps=trainer.global_step, max_train_steps=trainer.max_train_steps,
                              output_name=options.name, training_started_at=started)
        written.append(save_lora_kohya(trainer.models.unet, out / f"{options.name}.safetensors", te, meta, options.scale))
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["caption"]:
        from trainer.caption_cli import main as caption_main

        return caption_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m trainer", description="Train one SD 1.x LoRA.",
        epilog="`python -m trainer --fields` lists every config field with its type, default and meaning; "
               "`python -m trainer caption DATASET --trigger WORD` writes BLIP captions (see its --help).",
    )
    parser.add_argument("--config", help="training YAML (TrainConfig fields + optional output:); see --fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (dotted path)")
    parser.add_argument("--output", help="output folder (overrides output.dir)")
    parser.add_argument("--format", choices=["kohya", "diffusers", "both"], help="export layout (overrides output.format)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output folder")
    parser.add_argument("--fields", action="store_true", help="list every training config field (name, type, default, "
                        "description) and exit")
    args = parser.parse_args(argv)
    if args.fields:
        print(describe_fields(TrainConfig))
        return 0
    if not args.config:
        parser.error("--config is required (or --fields to list the config fields)")
    try:
        cfg, options, caption = read_run_config(args.config, args.set, args.output, args.format)
        problems = check_paths(cfg, caption)
        if problems:
            raise ConfigProblems(problems)
    except ConfigProblems as err:
        print(f"invalid config {args.config}:", file=sys.stderr)
        for line in err.problems:
            print(f"  {line}", file=sys.stderr)
        return EXIT_CONFIG
    from trainer.dataset_layouts import DatasetError
    from trainer.loop import TrainingDiverged
    from trainer.model_loading import BaseModelError

    try:
        if caption:  # before the dataset is read: the captions are what it reads
            from trainer.dataset_captions import caption_dataset
            from trainer.train_data import resolve_dataset

            print(caption_dataset(resolve_dataset(cfg.dataset), cfg.trigger_word, caption).summary(), file=sys.stderr)
        written = train_and_export(cfg, options, resume=args.resume)
    except DatasetError as err:
        print(f"invalid config {args.config}:\n  dataset: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except BaseModelError as err:
        print(f"invalid config {args.config}:\n  base_model: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except TrainingDiverged as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
