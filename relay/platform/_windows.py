"""Windows.

Python turns the console's Ctrl-C event into SIGINT and Ctrl-Break into
SIGBREAK; trio's signal receiver sees both.  Windows has no SIGHUP, so a
reload is asked for with a named event (or ``dbgrelay reload`` over the
admin pipe).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterable

import trio

import pywintypes  # isort: skip
import win32api
import win32event
import win32security
import winerror

#: Ctrl-C and Ctrl-Break at a console.
INTERRUPT_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGBREAK)

#: Ctrl-C and Ctrl-Break; a service stop comes through the service framework.
STOP_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGBREAK)


# Administrators and LocalSystem (the usual service account).
_ADMINS_SID = "BA"
_SYSTEM_SID = "SY"

log = logging.getLogger("dbgrelay.relay")


def current_user_sid() -> str:
    """The string SID of the account this process runs as."""
    token = win32security.OpenProcessToken(win32api.GetCurrentProcess(), win32security.TOKEN_QUERY)
    sid = win32security.GetTokenInformation(token, win32security.TokenUser)[0]
    return win32security.ConvertSidToStringSid(sid)


def admin_sddl(extra_sids: Iterable[str] = ()) -> str:
    """A protected DACL admitting Administrators, LocalSystem, this account and ``extra_sids``.

    "Protected" (``P``) keeps inheritable entries of a parent out; nobody
    else gets any access, not even to read.
    """
    sids = dict.fromkeys([_ADMINS_SID, _SYSTEM_SID, current_user_sid(), *extra_sids])
    return "D:P" + "".join(f"(A;;GA;;;{sid})" for sid in sids)


def security_attributes(sddl: str) -> pywintypes.SECURITY_ATTRIBUTES:
    """``SECURITY_ATTRIBUTES`` carrying the security descriptor ``sddl``."""
    attributes = pywintypes.SECURITY_ATTRIBUTES()
    attributes.SECURITY_DESCRIPTOR = (
        win32security.ConvertStringSecurityDescriptorToSecurityDescriptor(
            sddl, win32security.SDDL_REVISION_1
        )
    )
    attributes.bInheritHandle = False
    return attributes


def reload_event_name(pid: int) -> str:
    """The named event that asks relay process ``pid`` to reload (``Global\\`` namespace)."""
    return f"Global\\dbgrelay-reload-{pid}"


def _create_reload_event() -> tuple[object, str]:
    """Create this relay's reload event; ``Local\\`` when ``Global\\`` is not allowed.

    ``Global\\`` reaches a service in session 0 from an administrator's
    desktop session, but creating it needs SeCreateGlobalPrivilege, which
    services and administrators have and a plain account does not.
    """
    attributes = security_attributes(admin_sddl())
    name = reload_event_name(os.getpid())
    try:
        return win32event.CreateEvent(attributes, False, False, name), name
    except pywintypes.error as exc:
        if exc.winerror != winerror.ERROR_ACCESS_DENIED:
            raise
    name = name.replace("Global\\", "Local\\", 1)
    return win32event.CreateEvent(attributes, False, False, name), name


async def run_reload_trigger(
    reload: Callable[[str], object],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``reload(actor)`` each time the relay's named reload event is set, until cancelled.

    The event (auto-reset) is ``Global\\dbgrelay-reload-<pid>``; its DACL
    admits only Administrators, LocalSystem and the relay's own account, so
    only they can set it.  PowerShell sets it with
    ``[Threading.EventWaitHandle]::OpenExisting('Global\\dbgrelay-reload-<pid>').Set()``.
    ``task_status`` receives the event's name.

    Resource handling:
        The event handle is closed when this returns or is cancelled.
    """
    event, name = _create_reload_event()
    try:
        log.info("reload.trigger", extra={"event_name": name})
        task_status.started(name)
        while True:
            await trio.lowlevel.WaitForSingleObject(int(event))
            reload(f"event:{name}")
    finally:
        event.Close()
