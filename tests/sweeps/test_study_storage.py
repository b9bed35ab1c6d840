"""study.storage: the journal written through to an object store, an RDB URL checked up front,
and the shared folders (caches, class images) published once and fetched whole. Real servers on
127.0.0.1 (moto's S3, no Ray)."""

import pickle
import socket
from pathlib import Path

import optuna
import pytest

from sweeps import run as run_cli
from sweeps import storage
from sweeps.shared_folders import COMPLETE, TRAIN_CACHE, SharedFolder, fetch, publish
from sweeps.spec import SpecError, load_spec
from sweeps.study_storage import JOURNAL_FILE, flush, load_sweep_study, open_storage, study_uri
from tests.sweeps.local_servers import s3_server

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.yaml"
BUCKET = "lorasweep-test"


def _spec(*sets):
    return load_spec(DEMO, list(sets))


@pytest.mark.parametrize("value, expected", [
    ("mongodb://host/db", "backend 'mongodb' is not one Optuna stores studies in"),
    ("postgresql+nosuchdriver://u@host/db", "pip install nosuchdriver"),
    ("a study please", "is not a database URL"),
    ("postgresql://someone:secret@db.internal/sweeps", "give it in the driver's environment (PGPASSWORD"),
])
def test_a_study_storage_optuna_cannot_use_is_a_spec_error_naming_the_key(value, expected):
    with pytest.raises(SpecError) as err:
        _spec(f"study.storage={value}")
    (line,) = [p for p in err.value.problems if p.startswith("study.storage:")]
    assert expected in line


def test_journal_and_database_urls_are_accepted():
    assert _spec().study.storage == "journal"
    assert _spec("study.storage=sqlite:///study.db").study.storage == "sqlite:///study.db"
    assert _spec("study.storage=postgresql://u@db.internal:5432/sweeps").study.storage.startswith("postgresql://")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_a_study_database_that_does_not_answer_fails_before_any_training(tmp_path, capsys):
    url = f"postgresql://someone@127.0.0.1:{_closed_port()}/sweeps"
    code = run_cli.main(["--space", str(DEMO), "--set", f"storage={tmp_path}", "--set", f"study.storage={url}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"study.storage: cannot open the study database {url}" in err and "check that the server runs" in err
    assert not (tmp_path / "demo" / "tune").exists()  # nothing started


def test_sqlite_study_storage_holds_the_study(tmp_path):
    spec = _spec(f"storage={tmp_path}", f"study.storage=sqlite:///{tmp_path}/study.db")
    study = optuna.create_study(study_name=spec.name, storage=open_storage(spec))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert [t.value for t in load_sweep_study(spec).trials] == [t.value for t in study.trials]
    assert (tmp_path / "study.db").is_file() and not (tmp_path / "demo" / "study" / JOURNAL_FILE).exists()


def test_the_journal_of_a_remote_sweep_is_written_through_and_a_new_head_resumes_from_it(tmp_path, monkeypatch):
    with s3_server(BUCKET):
        spec = _spec(f"storage=s3://{BUCKET}/sweeps")
        (tmp_path / "head1").mkdir()
        monkeypatch.chdir(tmp_path / "head1")
        first = open_storage(spec)
        study = optuna.create_study(study_name=spec.name, storage=first)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        stored = storage.join(study_uri(spec), JOURNAL_FILE)
        local = tmp_path / "head1" / "runs" / "demo" / "study" / JOURNAL_FILE
        # Written through at once, then at most every UPLOAD_INTERVAL_S (each upload is the whole
        # journal), and all of it on flush: when a trial ends and before Tune saves the searcher.
        assert local.read_bytes().startswith(storage.read_bytes(stored)) and storage.size(stored) > 0
        flush(first)
        assert storage.read_bytes(stored) == local.read_bytes()
        values = [t.value for t in study.trials]
        pickled = pickle.dumps(first)  # as Tune keeps the searcher with its experiment

        # A new head: another working directory, nothing local.
        (tmp_path / "head2").mkdir()
        monkeypatch.chdir(tmp_path / "head2")
        assert [t.value for t in load_sweep_study(spec).trials] == values
        restored = pickle.loads(pickled)
        again = optuna.load_study(study_name=spec.name, storage=restored)
        assert [t.value for t in again.trials] == values
        again.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
        assert (tmp_path / "head2" / "runs" / "demo" / "study" / JOURNAL_FILE).is_file()
        assert len(load_sweep_study(spec).trials) == 4
        monkeypatch.chdir(tmp_path / "head1")  # the old head's copy is behind: it reads the longer stored one
        assert len(load_sweep_study(spec).trials) == 4


def test_shared_folders_are_published_once_and_fetched_whole(tmp_path):
    cache = tmp_path / "node1"
    folder = cache / "latents-abc"
    folder.mkdir(parents=True)
    (folder / "latents.safetensors").write_bytes(b"tensors")
    (folder / ".lock").write_text("")
    shared = (SharedFolder(TRAIN_CACHE, "latents-abc"),)
    with s3_server(BUCKET):
        uri = f"s3://{BUCKET}/sweeps/demo"
        assert publish(shared, uri, str(cache)) == ["train_cache/latents-abc"]
        assert publish(shared, uri, str(cache)) == []  # built once: never uploaded again
        assert storage.list_files(f"{uri}/shared/train_cache/latents-abc") == [COMPLETE, "latents.safetensors"]
        other = tmp_path / "node2"
        assert fetch(shared, uri, str(other)) == ["train_cache/latents-abc"]
        assert sorted(p.name for p in (other / "latents-abc").iterdir()) == ["latents.safetensors"]
        assert (other / "latents-abc" / "latents.safetensors").read_bytes() == b"tensors"
        assert fetch(shared, uri, str(other)) == []  # present: not downloaded again
        # An upload that never finished (no marker) is not fetched; the trainer builds the cache itself.
        storage.write_bytes(f"{uri}/shared/train_cache/latents-half/latents.safetensors", b"te")
        assert fetch((SharedFolder(TRAIN_CACHE, "latents-half"),), uri, str(other)) == []
        assert not (other / "latents-half").exists()


def test_class_images_are_shared_at_their_own_path_and_caches_under_each_nodes_cache(tmp_path):
    from sweeps.shared_folders import CLASS_IMAGES, plan_folders

    fixed = {"with_prior_preservation": True, "class_data_dir": str(tmp_path / "class")}
    caches, images = plan_folders((str(tmp_path / "driver-cache" / "latents-k"),), fixed)[:1], plan_folders((), fixed)
    assert caches[0].local(str(tmp_path / "node-cache")) == tmp_path / "node-cache" / "latents-k"
    (folder,) = images
    assert folder.kind == CLASS_IMAGES and folder.local(str(tmp_path / "node-cache")) == tmp_path / "class"
    assert folder.uri("s3://b/sweeps/demo") == "s3://b/sweeps/demo/shared/class_images/class"
    assert plan_folders((), {"class_data_dir": str(tmp_path / "class")}) == ()  # no prior preservation: nothing
