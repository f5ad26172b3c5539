"""``npipe://`` backends on Windows: the relay's ``open_backend`` against real named pipes.

The pipe servers and the relay's backend code both run in the Windows Python
under Wine (``npipe_checks.py``, one scenario per process).
"""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import WineTier

CHECKS = Path(__file__).with_name("npipe_checks.py")


def _scenario(wine_tier: WineTier, tmp_path: Path, name: str) -> dict:
    done = wine_tier.run(CHECKS, name, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_npipe_backend_echoes_a_megabyte(wine_tier: WineTier, tmp_path: Path) -> None:
    result = _scenario(wine_tier, tmp_path, "echo")
    assert result == {"same": True, "size": 1024 * 1024 + 3}


def test_absent_pipe_is_backend_unreachable(wine_tier: WineTier, tmp_path: Path) -> None:
    result = _scenario(wine_tier, tmp_path, "absent")
    assert result["reason"] == "backend_unreachable", result
    assert result["message"].startswith("backend npipe://./dbgrelay-test-"), result


def test_busy_pipe_is_retried_until_an_instance_is_free(
    wine_tier: WineTier, tmp_path: Path
) -> None:
    result = _scenario(wine_tier, tmp_path, "busy")
    assert result["order"] == ["first", "first closing", "second opened", "second"], result


def test_pipe_busy_past_connect_timeout_is_backend_timeout(
    wine_tier: WineTier, tmp_path: Path
) -> None:
    result = _scenario(wine_tier, tmp_path, "busy_timeout")
    assert result["reason"] == "backend_timeout", result
    assert "did not accept within 5s" in result["message"], result


def test_server_closing_the_pipe_is_eof_then_broken(wine_tier: WineTier, tmp_path: Path) -> None:
    result = _scenario(wine_tier, tmp_path, "eof")
    assert result == {"received": ["bye", ""], "send_after_eof": "broken"}


def test_cancelled_pending_read_leaves_pipe_usable(wine_tier: WineTier, tmp_path: Path) -> None:
    result = _scenario(wine_tier, tmp_path, "cancel_read")
    assert result == {"cancelled": True, "after": "still here"}


def test_forgotten_server_probe_sees_a_live_pipe_and_an_absent_one(
    wine_tier: WineTier, tmp_path: Path
) -> None:
    assert _scenario(wine_tier, tmp_path, "probe") == {"live": True, "absent": False}
