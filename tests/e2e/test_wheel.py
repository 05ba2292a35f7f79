"""The migrations ship inside the wheel, and are found there without the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--quiet", "-w", str(out)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    [built] = out.glob("fsm_hub-*.whl")
    return built


def test_the_wheel_contains_the_migrations(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("fsm_hub/migrations/0001_events.sql")
        names = archive.namelist()
    assert shipped == (ROOT / "migrations" / "0001_events.sql").read_bytes()
    assert sorted(n for n in names if n.startswith("fsm_hub/migrations/")) == sorted(
        f"fsm_hub/migrations/{p.name}" for p in (ROOT / "migrations").glob("*.sql")
    )


def test_an_unpacked_wheel_finds_its_migrations(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    probe = (
        "import fsm_hub.store.schema as s, importlib.resources as r, pathlib, sqlite3\n"
        "assert r.files('fsm_hub').joinpath('migrations').is_dir()\n"
        "print(s.__file__)\n"
        "print(' '.join(m.name for m in s.migrations()))\n"
        "db = sqlite3.connect(pathlib.Path('new.db'), isolation_level=None)\n"
        "print(s.prepare(db, pathlib.Path('new.db')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    where, names, version = result.stdout.splitlines()
    assert Path(where).is_relative_to(site)
    shipped = sorted(p.name for p in (ROOT / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    assert names == " ".join(shipped)
    assert version == str(len(shipped))
