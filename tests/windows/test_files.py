"""Secret files the admin commands write on Windows admit only their owner (read back under Wine)."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import WineTier

# Run under the Windows Python: each file's allow entries as (SID, access mask).
READ_DACLS = r"""
import json, sys
import win32api, win32security
token = win32security.OpenProcessToken(win32api.GetCurrentProcess(), win32security.TOKEN_QUERY)
me = win32security.GetTokenInformation(token, win32security.TokenUser)[0]
out = {"me": win32security.ConvertSidToStringSid(me), "files": {}}
for name in sys.argv[1:]:
    sd = win32security.GetFileSecurity(name, win32security.DACL_SECURITY_INFORMATION)
    dacl = sd.GetSecurityDescriptorDacl()
    aces = [dacl.GetAce(i) for i in range(dacl.GetAceCount())]
    out["files"][name] = [
        [ace[0][0], win32security.ConvertSidToStringSid(ace[2]), ace[1]] for ace in aces
    ]
print(json.dumps(out))
"""

SECRETS = ["keys/signing.key", "keys/audit.key", "pki/ca.key", "pki/server.key"]
PUBLIC = ["keys/jwks.json", "keys/audit.pub", "pki/ca.pem", "pki/server.pem"]
EVERYONE, SYSTEM = "S-1-1-0", "S-1-5-18"
ACCESS_ALLOWED = 0


def test_keys_and_certs_init_write_secrets_only_their_owner_can_open(
    wine_tier: WineTier, tmp_path: Path
) -> None:
    for args in (
        ("keys", "init", "--out", "keys"),
        ("certs", "init", "--out", "pki", "--host", "127.0.0.1"),
    ):
        done = wine_tier.run("-m", "relay", *args, cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    (tmp_path / "read_dacls.py").write_text(READ_DACLS)

    done = wine_tier.run("read_dacls.py", *SECRETS, *PUBLIC, cwd=tmp_path, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    files = answer["files"]
    for name in SECRETS:
        allowed = {sid for kind, sid, _mask in files[name] if kind == ACCESS_ALLOWED}
        # Wine keeps a DACL as Unix mode bits and reads SYSTEM back beside the
        # owner; on Windows the owner's entry is the only one.
        assert allowed <= {answer["me"], SYSTEM}, (name, files[name])
        assert answer["me"] in allowed, (name, files[name])
    # The read-back does tell files apart: public ones stay readable by everyone.
    for name in PUBLIC:
        assert EVERYONE in {sid for _kind, sid, _mask in files[name]}, (name, files[name])
