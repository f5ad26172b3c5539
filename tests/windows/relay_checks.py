"""Windows-side helpers for test_relay.py, run by the Windows Python under Wine.

``python relay_checks.py pipes PREFIX``: named-pipe debug-server stand-ins,
until killed: ``PREFIX-echo`` (echoes, any number of clients),
``PREFIX-busy`` (one instance, echoes, one client at a time) and
``PREFIX-reset`` (says ``bye`` and drops the client).  Prints ``ready``.

``python relay_checks.py acl PATH...``: each path's DACL allow entries as JSON,
and the account this runs as.

``python relay_checks.py set-event NAME``: set a named event (the relay's
reload trigger).

Not collected by pytest.
"""

import json
import sys
import threading

import win32api
import win32con
import win32event
import win32file
import win32pipe
import win32security

from tests.windows.pipe_echo import create_instance, echo_until_gone


def echo_client(pipe):
    echo_until_gone(pipe)
    win32file.CloseHandle(pipe)


def serve_echo(path, count):
    ready = threading.Event()

    def run():
        while True:
            pipe = create_instance(path, count)
            ready.set()
            win32pipe.ConnectNamedPipe(pipe, None)
            threading.Thread(target=echo_client, args=(pipe,), daemon=True).start()

    threading.Thread(target=run, daemon=True).start()
    ready.wait()


def serve_busy(path):
    # One instance: while a client holds it, the next one finds the pipe busy.
    pipe = create_instance(path, 1)

    def run():
        while True:
            win32pipe.ConnectNamedPipe(pipe, None)
            echo_until_gone(pipe)

    threading.Thread(target=run, daemon=True).start()


def serve_reset(path):
    pipe = create_instance(path, 1)

    def run():
        while True:
            win32pipe.ConnectNamedPipe(pipe, None)
            win32file.WriteFile(pipe, b"bye")
            win32file.FlushFileBuffers(pipe)
            win32pipe.DisconnectNamedPipe(pipe)

    threading.Thread(target=run, daemon=True).start()


def pipes(prefix):
    serve_echo(rf"\\.\pipe\{prefix}-echo", win32pipe.PIPE_UNLIMITED_INSTANCES)
    serve_busy(rf"\\.\pipe\{prefix}-busy")
    serve_reset(rf"\\.\pipe\{prefix}-reset")
    print("ready", flush=True)
    threading.Event().wait()


def acl(paths):
    token = win32security.OpenProcessToken(win32api.GetCurrentProcess(), win32security.TOKEN_QUERY)
    me = win32security.GetTokenInformation(token, win32security.TokenUser)[0]
    out = {"me": win32security.ConvertSidToStringSid(me), "paths": {}}
    for path in paths:
        if path.startswith("\\\\.\\pipe\\"):
            handle = win32file.CreateFile(
                path, win32con.READ_CONTROL, 0, None, win32con.OPEN_EXISTING, 0, None
            )
            sd = win32security.GetSecurityInfo(
                handle, win32security.SE_KERNEL_OBJECT, win32security.DACL_SECURITY_INFORMATION
            )
            handle.Close()
        else:
            sd = win32security.GetFileSecurity(path, win32security.DACL_SECURITY_INFORMATION)
        dacl = sd.GetSecurityDescriptorDacl()
        aces = [dacl.GetAce(i) for i in range(dacl.GetAceCount())]
        out["paths"][path] = [
            [ace[0][0], ace[0][1], win32security.ConvertSidToStringSid(ace[2]), ace[1]]
            for ace in aces
        ]
    print(json.dumps(out))


def set_event(name):
    event = win32event.OpenEvent(win32event.EVENT_MODIFY_STATE, False, name)
    win32event.SetEvent(event)
    print("set")


def main():
    command, *args = sys.argv[1:]
    if command == "pipes":
        pipes(*args)
    elif command == "acl":
        acl(args)
    elif command == "set-event":
        set_event(*args)


main()
