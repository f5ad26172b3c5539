"""A hostile debuggee: it attacks the relay that launched it and reports each attempt.

Server mode (how the relay runs it, as a managed target's launch command)::

    hostile.py serve PORT KEYFILE ADMIN_SOCKET

listens on 127.0.0.1:PORT, reads one JSON line from the first client
(``{"session_id", "audit_file", "relay_pid"}``: what an attacker learns from
``ps`` and the file system), runs every attack and answers one JSON line:
``{step: {"ok": bool, "detail": text}}``.  ``hostile.py now KEYFILE
ADMIN_SOCKET JSON`` runs the same attacks at once and prints the answer.

The attacks are the ones a debuggee made with ``system()`` against a relay
that ran it as its own user: read the audit key, list and end sessions on
the admin socket, rewrite its own audit file to say ``user=alice`` and
re-sign it with the relay's library, and reach the relay process itself.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path


def _admin(admin_socket: str, method: str, path: str) -> tuple[bool, str]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(admin_socket)
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split()[1])
    return status == 200, data.decode(errors="replace").splitlines()[0] + " " + data.decode(
        errors="replace"
    ).rpartition("\r\n\r\n")[2].strip()


def _resign(keyfile: str, audit_file: str, session_id: str) -> tuple[bool, str]:
    """Rewrite the audit file with user=alice and a fresh chain, signed with the relay's key."""
    from auth import load_audit_key
    from relay.audit import AuditWriter

    key = load_audit_key(Path(keyfile))
    path = Path(audit_file)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    forged = path.with_name(path.name + ".forged")
    writer = AuditWriter.create(forged, kind="session", session_id=session_id, signing_key=key)
    reserved = {"seq", "time", "event", "prev", "hash", "sig", "type"}
    for record in records[1:]:
        fields = {k: v for k, v in record.items() if k not in reserved}
        if "user" in fields:
            fields["user"] = "alice"
        if record["event"] == "session.closed":
            writer.close_session(**fields)
        else:
            writer.append(record["event"], **fields)
    writer.flush()
    writer.sync()
    writer.close()
    os.replace(forged, path)
    return True, f"rewrote and re-signed {path}"


def attack(keyfile: str, admin_socket: str, info: dict) -> dict:
    audit_file, sid, pid = info["audit_file"], info["session_id"], info["relay_pid"]

    def read_key() -> tuple[bool, str]:
        return True, f"read {len(Path(keyfile).read_bytes())} bytes of {keyfile}"

    def list_audit_dir() -> tuple[bool, str]:
        return True, str(sorted(os.listdir(Path(audit_file).parent)))

    def read_own_audit() -> tuple[bool, str]:
        return True, Path(audit_file).read_text()[:80]

    def rewrite_own_audit() -> tuple[bool, str]:
        with open(audit_file, "r+") as f:
            text = f.read()
            f.seek(0)
            f.write(text)  # unchanged: only whether it could be written matters here
        return True, "opened for writing"

    steps = {
        "read_audit_key": read_key,
        "list_audit_dir": list_audit_dir,
        "read_own_audit_file": read_own_audit,
        "open_own_audit_file_for_writing": rewrite_own_audit,
        "resign_own_audit_file": lambda: _resign(keyfile, audit_file, sid),
        "admin_list_sessions": lambda: _admin(admin_socket, "GET", "/v1/sessions"),
        "admin_end_session": lambda: _admin(admin_socket, "DELETE", f"/v1/sessions/{sid}"),
        "signal_relay": lambda: (os.kill(pid, 0), (True, f"may signal pid {pid}"))[1],
        "read_relay_environ": lambda: (True, Path(f"/proc/{pid}/environ").read_text()[:40]),
    }
    results = {}
    for name, step in steps.items():
        try:
            ok, detail = step()
        except Exception as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        results[name] = {"ok": ok, "detail": detail}
    return results


def serve(port: int, keyfile: str, admin_socket: str) -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        conn, _ = listener.accept()
        with conn:
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    return
                line += chunk
            answer = attack(keyfile, admin_socket, json.loads(line))
            conn.sendall(json.dumps(answer).encode() + b"\n")
            while conn.recv(4096):
                pass


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        print(json.dumps(attack(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))))
