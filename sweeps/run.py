"""python sweeps/run.py --space search.yaml [--address ADDR] [--set key=value ...] [--columns a,b,c]
                      [--dry-run | --status | --export-only | --resume | --fields]"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run a LoRA hyperparameter sweep on Ray Tune + Optuna.",
        epilog="The spec's sections are described in README.md (Running your own sweep) and "
               "docs/architecture.md; `--fields` lists every training field that `train:` fixes and "
               "`space:` searches, with its type, default and meaning.")
    p.add_argument("--space", help="sweep spec YAML (see examples/)")
    p.add_argument("--address", default=None, help="Ray cluster address; local Ray when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set search.num_trials=4 (repeatable)")
    p.add_argument("--columns", metavar="A,B,C", default=None,
                   help="metric columns of the trials table (--status, --export-only, the end of a sweep), e.g. "
                        "clip_score,cmmd,clip_kid,diversity,val_loss; default: clip_score, the toy world's accuracies "
                        "and cmmd, where trials report them")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the resolved sweep and its cost; start nothing")
    mode.add_argument("--status", action="store_true", help="show the trials of this sweep from its storage; start nothing")
    mode.add_argument("--export-only", action="store_true", help="export the winners of a finished sweep again")
    mode.add_argument("--resume", action="store_true",
                      help="continue the stored sweep with the spec it was started with (a sweep whose storage "
                           "holds the same spec also continues without it)")
    mode.add_argument("--fields", action="store_true", help="list every training field (train:/space: keys) and exit")
    args = p.parse_args(argv)
    if not args.fields and not args.space:
        p.error("--space is required (a sweep spec YAML such as examples/demo.yaml)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Heavy imports after argument parsing so --help is instant.
    from sweeps.cluster_fit import SweepCannotStart
    from sweeps.export import ExportError
    from sweeps.results import ColumnError, parse_columns
    from sweeps.spec import SpecError, load_spec
    from sweeps.storage import StorageError

    if args.fields:
        from trainer.config import TrainConfig, describe_fields

        print(describe_fields(TrainConfig))
        return 0
    try:
        columns = parse_columns(args.columns) if args.columns is not None else None
        spec = load_spec(args.space, args.overrides)
        if args.dry_run:
            print(describe(spec))
            return 0
        if args.status or args.export_only or args.resume:
            spec = _stored_or_given(spec, args.space)
        if args.status:
            from sweeps.status import sweep_status

            print(sweep_status(spec, columns))
            return 0
        return export_only(spec, columns) if args.export_only else sweep(spec, args, columns)
    except (SpecError, StorageError, FileNotFoundError, ExportError, SweepCannotStart, ColumnError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def describe(spec) -> str:
    """The dry run; once the sweep has run, its estimate beside what the trials measured."""
    from sweeps.dry_run import comparison_line, describe_sweep
    from sweeps.results import load_records
    from sweeps.tuner import can_resume

    text = describe_sweep(spec)
    if can_resume(spec):  # the storage holds this sweep: compare
        text += "\nafter the sweep: " + comparison_line(spec, [r.row for r in load_records(spec)])
    return text


def _stored_or_given(spec, source: str):
    """For --status, --export-only and --resume: the spec the sweep was started with, when its
    storage holds one; the given spec when it differs from that only in safe keys (export,
    tracking, a larger budget), so that `--export-only --set export.top_k=3` exports three."""
    from sweeps.stored_spec import differences, is_safe_change, read_stored, spec_record, stored_spec

    stored = stored_spec(spec)
    if stored is None:
        return spec
    diffs = differences(read_stored(spec), spec_record(spec))
    if all(is_safe_change(*d) for d in diffs):
        return spec
    print(f"using the spec stored with sweep {spec.name} ({source} differs in: "
          f"{', '.join(key for key, _, _ in diffs)})", flush=True)
    return stored


def sweep(spec, args, columns: list[str] | None = None) -> int:
    from sweeps.results import sweep_uri
    from sweeps.shared_folders import prefetch, share_plan
    from sweeps.storage import check_writable
    from sweeps.stored_spec import check_against_stored, store
    from sweeps.study_storage import open_storage
    from sweeps.trial_plan import build_plan
    from sweeps.tuner import can_resume, run_sweep

    check_writable(sweep_uri(spec))  # before models are built or Ray is started
    open_storage(spec)  # and the study's database answers
    if args.resume and not can_resume(spec):
        raise FileNotFoundError(f"--resume: no sweep {spec.name} in {spec.storage_uri}; run without --resume to start it")
    notes = [] if args.resume else check_against_stored(spec, args.space)
    for note in notes:
        print(f"continuing sweep {spec.name} with a changed setting that is safe to change: {note}", flush=True)
    fetched = prefetch(spec)  # a new head: the caches and class images the sweep's storage holds
    if fetched:
        print(f"sweep {spec.name}: fetched from {sweep_uri(spec)}: {', '.join(fetched)}", flush=True)
    plan = share_plan(spec, build_plan(spec, args.space, local=not args.address, address=args.address))
    store(spec)
    print(f"sweep {spec.name}: {spec.search.num_trials} trials, {spec.search.max_concurrent} at a time, "
          f"output {spec.output_dir}", flush=True)
    run_sweep(spec, plan, args.address, resume=args.resume)
    return export_only(spec, columns)


def export_only(spec, columns: list[str] | None = None) -> int:
    from sweeps.dry_run import comparison_line
    from sweeps.export import export_sweep
    from sweeps.report import finish_report
    from sweeps.results import format_table, load_records, sweep_uri
    from sweeps.tracking import summary_run, sync_command

    records = load_records(spec)
    print("\n" + format_table([r.row for r in records], spec, columns))
    print(comparison_line(spec, [r.row for r in records]))
    with summary_run(spec) as run:
        result = export_sweep(spec, records, run=run)
        try:
            print(f"\nreport: {finish_report(spec, records, run)}")
        except Exception as err:  # the export is done; a report that fails must not hide it
            print(f"\nreport not written ({type(err).__name__}: {err}); try: python sweeps/report.py {sweep_uri(spec)}")
    command = sync_command(spec)
    if command:
        print(f"\nW&B offline runs; upload them with:\n  {command}")
    print(f"\nexported {len(result.manifest['entries'])} LoRA(s) with sha256 manifest: {result.manifest_uri}")
    print(f"best config and score: {result.best.with_name('best.json')}")
    print(f"best LoRA: {result.best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
