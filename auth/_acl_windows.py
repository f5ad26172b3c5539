"""Owner-only secret files on Windows.

File modes mean almost nothing on Windows (0600 only clears the read-only
flag); what keeps a secret from other accounts is the file's DACL.  A new
file inherits its folder's entries, which on most folders admit Users or
Authenticated Users, so secrets get an explicit DACL instead.
"""

from __future__ import annotations

import os

import ntsecuritycon
import win32api
import win32security


def _current_user_sid():
    token = win32security.OpenProcessToken(win32api.GetCurrentProcess(), win32security.TOKEN_QUERY)
    return win32security.GetTokenInformation(token, win32security.TokenUser)[0]


def restrict_dir_to_owner(path: str | os.PathLike[str]) -> None:
    """Give the folder ``path`` a protected, inheritable owner-only DACL.

    Files and folders created inside inherit the single entry, so audit
    files and the state database admit only the relay's account from the
    moment they exist.

    Raises:
        OSError: the DACL cannot be set.
    """
    _set_owner_only(path, ntsecuritycon.OBJECT_INHERIT_ACE | ntsecuritycon.CONTAINER_INHERIT_ACE)


def restrict_to_owner(path: str | os.PathLike[str]) -> None:
    """Give ``path`` a protected DACL whose only entry grants its creator full access.

    "Protected" stops the folder's inheritable entries from being added back.
    The account running this (the file's creator) is the one admitted; call it
    on a file just created, before a secret is written into it.

    Raises:
        OSError: the DACL cannot be set (``pywintypes.error`` is translated).
    """
    _set_owner_only(path, 0)


def _set_owner_only(path: str | os.PathLike[str], inherit: int) -> None:
    import pywintypes

    try:
        dacl = win32security.ACL()
        dacl.AddAccessAllowedAceEx(
            win32security.ACL_REVISION_DS,
            inherit,
            ntsecuritycon.FILE_ALL_ACCESS,
            _current_user_sid(),
        )
        sd = win32security.SECURITY_DESCRIPTOR()
        sd.SetSecurityDescriptorDacl(True, dacl, False)
        sd.SetSecurityDescriptorControl(
            win32security.SE_DACL_PROTECTED, win32security.SE_DACL_PROTECTED
        )
        win32security.SetFileSecurity(os.fspath(path), win32security.DACL_SECURITY_INFORMATION, sd)
    except pywintypes.error as exc:
        raise OSError(exc.winerror, exc.strerror, os.fspath(path)) from exc
