"""The shared helpers: atomic writes, the file lock, sha256, the YAML reader, --set, the cache folder."""

import hashlib
import multiprocessing
import os
from pathlib import Path

import pytest

from common.cache_dir import cache_root
from common.files import atomic_folder, atomic_write, atomic_write_text, file_lock, remove_leftovers, sha256_file
from common.overrides import apply_overrides
from common.yaml_files import YamlFileError, parse_yaml, read_yaml


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")

    def broken(tmp: Path):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary left behind
    assert (target.stat().st_mode & 0o777) == 0o644


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "w.bin").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "w.bin").write_text("2")
            raise RuntimeError
    assert (target / "w.bin").read_text() == "1"
    with atomic_folder(target) as tmp:
        (tmp / "v.bin").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["v.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_remove_leftovers_only_touches_that_names_temporaries(tmp_path):
    (tmp_path / ".x.abc.tmp").write_text("")
    (tmp_path / ".x.def.tmp").mkdir()
    (tmp_path / ".y.abc.tmp").write_text("")
    (tmp_path / "x").write_text("")
    remove_leftovers(tmp_path, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".y.abc.tmp", "x"]


def _add_under_lock(lock: str, counter: str, n: int) -> None:
    for _ in range(n):
        with file_lock(lock):
            value = int(Path(counter).read_text())
            Path(counter).write_text(str(value + 1))


def test_file_lock_serialises_processes(tmp_path):
    counter = tmp_path / "n"
    counter.write_text("0")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_under_lock, args=(str(tmp_path / "l.lock"), str(counter), 200)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert int(counter.read_text()) == 600  # a lost update would show without the lock


def test_sha256_file_sees_a_rewritten_file(tmp_path):
    f = tmp_path / "w"
    f.write_bytes(b"a" * 10)
    assert sha256_file(f) == hashlib.sha256(b"a" * 10).hexdigest()
    atomic_write(f, lambda tmp: tmp.write_bytes(b"b" * 10))  # same size, new inode
    assert sha256_file(f) == hashlib.sha256(b"b" * 10).hexdigest()


@pytest.mark.parametrize("text, line, key", [
    ("name: a\nbase_model: x\nname: b\n", 3, "name"),
    ("space:\n  lr: {type: loguniform}\ntrain: {}\nspace:\n  rank: [4]\n", 4, "space"),
    ("eval:\n  seeds: [0]\n  suite:\n    natural: [a]\n    natural: [b]\n", 5, "natural"),
    ("- a: 1\n  b: 2\n  a: 3\n", 3, "a"),
])
def test_duplicate_keys_are_refused_at_any_depth(text, line, key):
    with pytest.raises(YamlFileError) as err:
        parse_yaml(text, "spec.yaml")
    msg = str(err.value)
    assert msg.startswith(f"spec.yaml:{line}:") and "not valid YAML" in msg and f"duplicate key '{key}'" in msg


def test_merge_keys_may_be_overridden():
    assert parse_yaml("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n")["c"] == {"x": 3, "y": 2}


def test_tabs_and_missing_files_name_the_place(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("train:\n\tlr: 1\n")
    with pytest.raises(YamlFileError, match=r"t\.yaml:2:1: .*replace the tabs"):
        read_yaml(bad)
    with pytest.raises(YamlFileError, match="nope.yaml: file not found"):
        read_yaml(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_scalars_and_report_bad_items():
    data = {"search": {"num_trials": 8}, "name": "x"}
    problems = apply_overrides(data, ["search.num_trials=4", "space.rank=[2, 4]", "train.lr=1e-4", "flag=true",
                                      "noequals", "name.sub=1", "train.x=[1,"])
    assert data["search"]["num_trials"] == 4 and data["space"]["rank"] == [2, 4] and data["flag"] is True
    assert data["train"]["lr"] == 1e-4
    assert len(problems) == 3
    assert "noequals" in problems[0] and "name is not a section" in problems[1] and "train.x" in problems[2]


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORASWEEP_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("LORASWEEP_CACHE")
    assert str(cache_root()) == os.path.expanduser("~/.cache/lorasweep")


def test_exponent_floats_without_a_dot_are_floats():
    # YAML 1.1 would read these as strings, and a `choice` of learning rates would hold strings.
    assert parse_yaml("lr: 3e-4\nvalues: [1e-5, 2E+3, '1e-4']\n") == {"lr": 3e-4, "values": [1e-5, 2e3, "1e-4"]}
