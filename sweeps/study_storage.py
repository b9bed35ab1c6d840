"""Where a sweep's Optuna study lives (`study.storage`), so that a new head resumes with its history.

`journal` (the default): an Optuna journal file, `<sweep>/study/optuna.journal`. With a local or
NFS `storage:` it lies in the sweep's folder; with an object store (`s3://`) the driver keeps it
in its local mirror (SweepSpec.output_dir) and writes it through to `<sweep>/study/` in the
storage, and a driver without the local file (a new head) starts from the stored one. Only the
driver writes the study (the searcher runs there), so one writer appends. An object cannot be
appended to, so each write-through uploads the whole journal: at most every UPLOAD_INTERVAL_S,
and always when a trial ends and before Tune saves the searcher with its experiment state
(sweeps.search calls `flush`), so the stored journal always holds every trial that state knows.

An Optuna RDB URL (`sqlite:///study.db`, `postgresql://user@host/db`): the study lives in that
database, which outlives any head; Optuna's RDBStorage creates its tables on first use. The URL
holds no password (it is stored with the sweep): the database driver reads PGPASSWORD or ~/.pgpass.

`pruned.json` (which trials the scheduler pruned, and at which step) is written straight into
`<sweep>/study/` in the sweep's storage, wherever the study lives.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend

from sweeps import storage
from sweeps.spec_schema import SweepSpec

STUDY_DIR = "study"  # in the sweep's folder (storage) and in its local mirror (output_dir)
JOURNAL_FILE = "optuna.journal"
PRUNED_FILE = "pruned.json"
RAY_TRIAL_ATTR = "ray_trial_id"  # user attr on each Optuna trial: which Tune trial ran it
JOURNAL = "journal"
# RDB backends Optuna (SQLAlchemy) serves, with the driver modules that SQLAlchemy can use for each.
RDB_DRIVERS = {"sqlite": ("sqlite3",), "postgresql": ("psycopg2", "psycopg"), "mysql": ("pymysql", "MySQLdb")}
UPLOAD_INTERVAL_S = 10.0  # between write-throughs of a growing journal (each uploads all of it)
CONNECT_TIMEOUT_S = 10  # a database that does not answer is an error before any training, not a hang


def study_dir(spec: SweepSpec) -> Path:
    """The study's folder on this machine (the journal, for optuna-dashboard)."""
    return Path(spec.output_dir) / STUDY_DIR


def study_uri(spec: SweepSpec) -> str:
    """The study's folder in the sweep's storage: pruned.json, and the journal's stored copy."""
    return storage.join(spec.storage_uri, spec.name, STUDY_DIR)


def storage_problems(spec: SweepSpec) -> list[str]:
    """`study.storage: ...` lines for a value that is neither `journal` nor a usable RDB URL."""
    value = spec.study.storage
    if value == JOURNAL:
        return []
    fix = "use `journal` or an RDB URL such as sqlite:///study.db or postgresql://user@host:5432/db"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except ArgumentError:
        return [f"study.storage: {value!r} is not a database URL; {fix}"]
    if url.get_backend_name() not in RDB_DRIVERS:
        return [f"study.storage: backend {url.get_backend_name()!r} is not one Optuna stores studies in; {fix}"]
    if url.password:
        # The spec is stored with the sweep (spec.json) and the searcher pickled with Tune's state.
        return ["study.storage: the URL holds a password, which would be written into the sweep's storage "
                "(spec.json, Tune's experiment state); remove it and give it in the driver's environment "
                "(PGPASSWORD, or ~/.pgpass; MYSQL_PWD for mysql)"]
    driver = url.get_driver_name() if "+" in url.drivername else None
    wanted = (driver,) if driver else RDB_DRIVERS[url.get_backend_name()]
    if not any(importlib.util.find_spec(m) for m in wanted):
        return [f"study.storage: no database driver for {url.get_backend_name()} is installed; "
                f"pip install {' or '.join(wanted)}"]
    return []


def rdb_url(value: str) -> str:
    """The URL for SQLAlchemy: plain `postgresql://` means psycopg2 to it; use psycopg 3 when only that is installed."""
    from sqlalchemy.engine import make_url

    url = make_url(value)
    if url.drivername == "postgresql" and not importlib.util.find_spec("psycopg2") and importlib.util.find_spec("psycopg"):
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def shown_url(value: str) -> str:
    """The URL as printed: the password hidden."""
    from sqlalchemy.engine import make_url

    return make_url(value).render_as_string(hide_password=True)


class MirroredJournalBackend(JournalFileBackend):
    """A journal file on this machine, written through to a copy in the sweep's storage after every
    append; opened (or unpickled on a new head) from that copy when it holds more than the local file."""

    def __init__(self, file_path: str, mirror: str, interval_s: float = UPLOAD_INTERVAL_S):
        self._mirror, self._interval_s = mirror, interval_s
        self._uploaded_at, self._dirty = 0.0, False
        # The local mirror of a remote sweep is ./runs/<name> under the driver's working directory:
        # a new head restoring the pickled searcher keeps its journal under its own.
        path = Path(file_path).resolve()
        self._relative = str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else None
        _pull(path, mirror)
        super().__init__(str(path))

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        super().append_logs(logs)
        self._dirty = True
        if time.monotonic() - self._uploaded_at >= self._interval_s:
            self.flush()

    def flush(self) -> None:
        """Upload the journal now if it changed since the last upload."""
        if self._dirty:
            storage.copy_file(self._file_path, self._mirror)
            self._uploaded_at, self._dirty = time.monotonic(), False

    def __setstate__(self, state: dict) -> None:
        # The searcher is pickled with Tune's experiment state and restored on whatever head resumes.
        self.__dict__.update(state)
        self._uploaded_at = 0.0  # a monotonic time of another process means nothing here
        if self.__dict__.get("_relative"):
            self._file_path = str(Path.cwd() / self._relative)
            self._lock = type(self._lock)(self._file_path)  # the symlink lock names the file it guards
        _pull(Path(self._file_path), self._mirror)
        if not Path(self._file_path).exists():
            Path(self._file_path).parent.mkdir(parents=True, exist_ok=True)
            open(self._file_path, "ab").close()


def flush(study_storage: BaseStorage | None) -> None:
    """Write a journal through to the sweep's storage now (no-op for other storages)."""
    backend = getattr(study_storage, "_backend", None)
    if isinstance(backend, MirroredJournalBackend):
        backend.flush()


def _pull(local: Path, mirror: str) -> None:
    """Replace the local journal with the stored one when that is longer (a journal only grows)."""
    if not storage.exists(mirror):
        return
    if local.is_file() and local.stat().st_size >= storage.size(mirror):
        return
    storage.copy_file(mirror, local)


def journal_storage(folder: str | Path, mirror: str | None = None) -> JournalStorage:
    """The journal `<folder>/optuna.journal`; `mirror`: the folder in the sweep's storage it is written through to."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / JOURNAL_FILE)
    if mirror is None:
        return JournalStorage(JournalFileBackend(path))
    return JournalStorage(MirroredJournalBackend(path, storage.join(mirror, JOURNAL_FILE)))


def open_storage(spec: SweepSpec) -> BaseStorage:
    """The sweep's study storage; a database that cannot be reached raises StorageError naming `study.storage`."""
    if spec.study.storage == JOURNAL:
        return journal_storage(study_dir(spec), study_uri(spec) if spec.is_remote else None)
    url = rdb_url(spec.study.storage)
    connect = {"connect_timeout": CONNECT_TIMEOUT_S} if url.startswith("postgresql") or url.startswith("mysql") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": connect} if connect else None)
    except Exception as err:  # SQLAlchemy's OperationalError and friends: no server, wrong password, no database
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise storage.StorageError(f"study.storage: cannot open the study database {shown_url(spec.study.storage)} "
                                   f"({first}); check that the server runs and the URL is right") from None


def has_study(spec: SweepSpec) -> bool:
    """Whether a study may exist yet: always for a database, for a journal when a copy of it exists."""
    if spec.study.storage != JOURNAL:
        return True
    stored = spec.is_remote and storage.exists(storage.join(study_uri(spec), JOURNAL_FILE))
    return (study_dir(spec) / JOURNAL_FILE).is_file() or stored


def load_sweep_study(spec: SweepSpec) -> optuna.Study | None:
    """The sweep's Optuna study, or None when it has none yet (nothing suggested)."""
    if not has_study(spec):
        return None
    try:
        return optuna.load_study(study_name=spec.name, storage=open_storage(spec))
    except KeyError:
        return None


def dashboard_target(spec: SweepSpec) -> str:
    """What `optuna-dashboard` opens for this sweep: the journal file on this machine or the database URL (no password)."""
    return str(study_dir(spec) / JOURNAL_FILE) if spec.study.storage == JOURNAL else shown_url(spec.study.storage)


def pruned_uri(spec: SweepSpec) -> str:
    return storage.join(study_uri(spec), PRUNED_FILE)


def load_pruned(folder: str | Path) -> dict[str, int]:
    """Tune trial id -> the step at which the trial was pruned, from `<folder>/pruned.json`
    (a local folder or one in an object store); {} when none were."""
    path = storage.join(folder, PRUNED_FILE)
    if not storage.exists(path):
        return {}
    return {k: v["step"] for k, v in json.loads(storage.read_text(path)).items()}
