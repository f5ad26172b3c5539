"""Atomic, private file writes shared by keys.py and pki.py."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from auth import KeyFileError, init_keys
from auth._files import ensure_private_dir, write_private, write_public


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_replacing_a_world_readable_file_makes_it_private(tmp_path: Path) -> None:
    target = tmp_path / "secret.key"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_private(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]


def test_overwrite_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    keys = tmp_path / "keys"
    init_keys(keys)
    (keys / "signing.key").unlink()
    (keys / "signing.key").symlink_to(elsewhere)
    init_keys(keys, overwrite=True)
    assert elsewhere.read_bytes() == b"untouched"
    assert not (keys / "signing.key").is_symlink()
    assert mode(keys / "signing.key") == 0o600


def test_public_write(tmp_path: Path) -> None:
    target = tmp_path / "ca.pem"
    write_public(target, b"cert")
    assert mode(target) == 0o644


def test_write_into_missing_folder_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "x.key"
    with pytest.raises(KeyFileError, match="cannot create file") as info:
        write_private(target, b"x")
    assert str(target) in str(info.value)


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    # The rename fails because the target is a folder; the temp file must go.
    (tmp_path / "x.key").mkdir()
    with pytest.raises(KeyFileError, match="cannot write file"):
        write_private(tmp_path / "x.key", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["x.key"]


def test_ensure_private_dir(tmp_path: Path) -> None:
    made = ensure_private_dir(tmp_path / "a" / "b")
    assert mode(made) == 0o700
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeyFileError, match="not a folder"):
        ensure_private_dir(tmp_path / "file")
