"""A study that survives the head: a sweep whose study lives in a real PostgreSQL server, and one on
`s3://` storage (moto's S3 server on 127.0.0.1), each SIGKILLed mid-sweep and resumed with the
history it had. The S3 sweep (DreamBooth prior preservation, its class images rendered by the
first head) is killed while a trial runs with a checkpoint saved, in the middle of an upload of
Tune's state (a search-generator state of the snapshot before is what the storage keeps); it
resumes on a "new head" (another working directory; the old one, the node's cache folder and the
class folder deleted) from the storage alone, and `sweeps/pull.py` fetches its winner from s3://
with the checksum verified."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import wandb
from ray import cloudpickle

from sweeps import storage
from sweeps.results import load_records
from sweeps.shared_folders import CLASS_IMAGES, SharedFolder, fetch, publish
from sweeps.snapshot_repair import SEARCH_GEN_STATE
from sweeps.spec import load_spec
from sweeps.study_storage import JOURNAL_FILE, PRUNED_FILE, load_sweep_study, rdb_url, study_uri
from tests.sweeps.driver_kill import ENDED, finished, mid_trial, run_and_kill
from tests.sweeps.local_servers import postgres_server, s3_server

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.yaml"
BUCKET = "lorasweep-sweeps"


def _settings(*extra: str, trials: int, steps: int) -> list[str]:
    return [f"search.num_trials={trials}", "search.max_concurrent=1", f"train.max_train_steps={steps}", "eval.interval=2",
            "eval.seeds=[0]", *extra]


@pytest.fixture(scope="module")
def s3_bucket():
    """One S3 server for the module's tests (each works under its own prefix of BUCKET)."""
    with s3_server(BUCKET):
        yield BUCKET


def _command(sets: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", str(DEMO), *[a for s in sets for a in ("--set", s)]]


def test_a_fetched_shared_folder_keeps_the_mtimes_the_latent_cache_key_holds(tmp_path, s3_bucket):
    """Class images fetched on a new head with fresh mtimes would change the latent cache's key
    (paths, sizes, mtimes of the images encoded): the latents would be built and published again."""
    made = tmp_path / "head1" / "class"
    made.mkdir(parents=True)
    for i, when in enumerate((1_600_000_000_123_456_789, 1_700_000_000_987_654_321)):
        (made / f"class_{i:05d}.png").write_bytes(b"png %d" % i)
        os.utime(made / f"class_{i:05d}.png", ns=(when, when))
    stamps = {p.name: p.stat().st_mtime_ns for p in made.iterdir()}
    uri = f"s3://{s3_bucket}/mtimes"
    assert publish((SharedFolder(CLASS_IMAGES, "class", str(made)),), uri, None) == ["class_images/class"]
    shutil.rmtree(made)  # the head is lost; the new one fetches the folder to the same path
    assert fetch((SharedFolder(CLASS_IMAGES, "class", str(made)),), uri, None) == ["class_images/class"]
    assert {p.name: p.stat().st_mtime_ns for p in made.iterdir()} == stamps
    assert (made / "class_00001.png").read_bytes() == b"png 1"


def _recording(ready, folder: str, versions: list[bytes]):
    """`ready`, also keeping each new version of the search generator's state in `folder`."""
    def check(records):
        for name in storage.listdir(folder):
            if name.startswith(SEARCH_GEN_STATE):
                data = storage.read_bytes(storage.join(folder, name))
                if not versions or versions[-1] != data:
                    versions.append(data)
        return ready(records)
    return check


def _pull(source: str, to: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sweeps" / "pull.py"), source, "--to", str(to)],
                          capture_output=True, text=True, timeout=120)


def _history(study: optuna.Study) -> dict:
    return {t.number: (t.state, t.value, t.params) for t in study.trials}


def _kept_history(before: dict, after: optuna.Study, trials: int, out: str = "") -> None:
    """The resumed study kept every finished trial as it was and ran the rest of the budget.
    `out`: the resumed driver's output, shown when it did not."""
    states = [t.state.name for t in after.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == trials, (states, out[-4000:])
    assert set(states) <= {"COMPLETE", "PRUNED", "FAIL"}, states
    finished = {n: h for n, h in before.items() if h[0].is_finished()}
    assert len(finished) >= 1
    assert {n: h for n, h in _history(after).items() if n in finished} == finished


@pytest.mark.slow
def test_a_sweep_whose_study_lives_in_postgresql_is_killed_and_resumed_with_its_history(tmp_path):
    with postgres_server() as url:
        sets = _settings(f"storage={tmp_path}", f"study.storage={url}", trials=2, steps=2)
        spec = load_spec(DEMO, sets)
        run_and_kill(_command(sets), spec, finished(1), tmp_path)
        before = _history(load_sweep_study(spec))
        assert not (tmp_path / "demo" / "study" / JOURNAL_FILE).exists()  # the study is in the database only

        resumed = subprocess.run([*_command(sets), "--resume"], capture_output=True, text=True, timeout=500, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert f"resuming sweep demo from {tmp_path / 'demo' / 'tune'}" in resumed.stdout
        _kept_history(before, optuna.load_study(study_name="demo", storage=rdb_url(url)), 2)
        assert len(load_records(spec)) == 2 and all(r.row.state in ENDED for r in load_records(spec))
        assert (tmp_path / "demo" / "best.json").is_file()


@pytest.mark.slow
def test_a_sweep_on_s3_is_resumed_on_a_new_head_from_storage_alone_and_its_winner_pulled(tmp_path, monkeypatch, s3_bucket):
    # A W&B service of this process, as a notebook or a wrapper script that used wandb leaves one
    # (WANDB_SERVICE in the environment the heads inherit): the heads' trials must not share it, or the
    # resumed trial finds its run id held there by the killed head's trial ("run ID ... is in use").
    wandb.init(project="parent", mode="offline", dir=str(tmp_path / "parent-wandb")).finish()
    assert "WANDB_SERVICE" in os.environ
    node_cache, class_dir = tmp_path / "node-cache", tmp_path / "class-images"
    # DreamBooth prior preservation with a class folder that does not exist yet: the first head renders it.
    prior = ["train.with_prior_preservation=true", "train.class_prompt=a shape", f"train.class_data_dir={class_dir}",
             "train.num_class_images=2", "train.class_sampling={steps: 2, sampler: ddim}"]
    sets = _settings(f"storage=s3://{BUCKET}/sweeps", f"train.cache_dir={node_cache}", "tracking.wandb.enabled=true",
                     *prior, trials=2, steps=4)
    sweep = f"s3://{BUCKET}/sweeps/demo"
    for head in ("head1", "head2", "reader"):
        (tmp_path / head).mkdir()
    monkeypatch.chdir(tmp_path / "reader")  # this process reads the sweep as `--status` would, from a third folder
    spec = load_spec(DEMO, sets)
    saved: list[bytes] = []  # every version of the search generator's state the storage held
    first = run_and_kill(_command(sets), spec, _recording(mid_trial(1), f"{sweep}/tune", saved), tmp_path / "head1",
                         env={"TUNE_GLOBAL_CHECKPOINT_S": "1"})  # state saves every second, not every 10+
    # The head was lost in the middle of an upload: its last search-generator state did not reach the
    # storage, the one of the snapshot before trial 2 was suggested is there (sweeps.snapshot_repair).
    stale = [v for v in saved if cloudpickle.loads(v)["counter"] < cloudpickle.loads(saved[-1])["counter"]]
    assert stale, [cloudpickle.loads(v)["counter"] for v in saved]
    (gen_state,) = [n for n in storage.listdir(f"{sweep}/tune") if n.startswith(SEARCH_GEN_STATE)]
    storage.write_bytes(f"{sweep}/tune/{gen_state}", stale[-1])
    assert f"published to {sweep}/shared: train_cache/latents-" in first, first[-3000:]
    # The class images were rendered once, on the first head, and published beside the caches.
    assert f"class images: 2 written into {class_dir}" in first and f"class_images/{class_dir.name}" in first
    before = _history(load_sweep_study(spec))
    stored_journal = storage.read_bytes(storage.join(study_uri(spec), JOURNAL_FILE))
    # The stored journal may lag the head's copy by the appends after its last write-through
    # (never a trial that ended or one Tune's saved state knows: those flush it).
    assert (tmp_path / "head1" / "runs" / "demo" / "study" / JOURNAL_FILE).read_bytes().startswith(stored_journal)
    # The head is lost: its folder and the node's caches with it.
    shutil.rmtree(tmp_path / "head1")
    shutil.rmtree(node_cache)
    shutil.rmtree(class_dir)

    resumed = subprocess.run([*_command(sets), "--resume"], capture_output=True, text=True, timeout=500,
                             cwd=tmp_path / "head2")
    out = resumed.stdout
    assert resumed.returncode == 0, out[-3000:] + resumed.stderr[-3000:]
    assert f"resuming sweep demo from {sweep}/tune" in out
    assert f"saved search state made consistent with its trials: {gen_state}: 1 trial(s) suggested" in out, out[-3000:]
    # The caches were fetched from the storage before preparing, not built again (nor published again).
    assert f"fetched from {sweep}: train_cache/latents-" in out and "published to" not in out
    # So were the class images, into the folder the trials read: none rendered again.
    assert f"class_images/{class_dir.name}" in out.split("fetched from", 1)[1].splitlines()[0]
    assert "class images:" not in out
    stored_classes = f"{sweep}/shared/class_images/{class_dir.name}"
    assert sorted(p.name for p in class_dir.iterdir()) == [n for n in storage.list_files(stored_classes) if n != ".complete"]
    assert all((class_dir / n).read_bytes() == storage.read_bytes(f"{stored_classes}/{n}")
               for n in storage.list_files(stored_classes) if n != ".complete")
    (latents,) = [n for n in storage.listdir(f"{sweep}/shared/train_cache") if n.startswith("latents-")]
    assert (node_cache / latents / "latents.safetensors").read_bytes() == \
        storage.read_bytes(f"{sweep}/shared/train_cache/{latents}/latents.safetensors")

    _kept_history(before, load_sweep_study(spec), 2, out)
    records = load_records(spec)
    assert len(records) == 2 and all(r.row.state in ENDED for r in records)
    # The trial the first head was running went on from its checkpoint on the new head.
    assert any(r.result.metrics.get("resumed_from_step", 0) >= 2 for r in records), [r.result.metrics for r in records]
    pruned = {r.row.trial_id for r in records if r.row.state == "pruned"}
    if storage.exists(storage.join(study_uri(spec), PRUNED_FILE)):
        assert set(json.loads(storage.read_text(storage.join(study_uri(spec), PRUNED_FILE)))) == pruned
    # Every trial's offline W&B run (and the summary run) is in the storage, not on a lost disk.
    runs = [n for n in storage.listdir(f"{sweep}/wandb") if n.startswith("offline-run-")]
    assert len(runs) >= len(records) + 1, runs
    assert all(any(f.endswith(".wandb") for f in storage.list_files(f"{sweep}/wandb/{r}")) for r in runs)
    assert "aws s3 cp --recursive" in out and "wandb sync" in out

    pulled = _pull(sweep, tmp_path / "winner.safetensors")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    manifest = json.loads(storage.read_text(f"{sweep}/export/manifest.json"))
    rel = manifest["entries"][0]["files"]["kohya"]
    assert storage.sha256_file(tmp_path / "winner.safetensors") == manifest["sha256"][rel]
    # A damaged file in the bucket is refused, not pulled.
    storage.write_bytes(f"{sweep}/{rel}", b"not the exported LoRA")
    refused = _pull(sweep, tmp_path / "bad.safetensors")
    assert refused.returncode == 2 and "does not match the manifest" in refused.stderr
    assert not (tmp_path / "bad.safetensors").exists()
