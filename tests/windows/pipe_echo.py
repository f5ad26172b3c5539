"""Named-pipe echo for the Windows-side check scripts (``npipe_checks.py``, ``relay_checks.py``).

Those scripts run as ``python SCRIPT.py`` under the tier's embeddable
Windows Python, whose ``._pth`` file leaves the script's folder off
``sys.path``; the checkout is on it (``scripts/wine-tier``), so they import
this module as ``tests.windows.pipe_echo``.  Not collected by pytest.
"""

import pywintypes
import win32file
import win32pipe


def create_instance(path: str, instances: int):
    """A duplex byte-mode instance of pipe ``path``, which may have ``instances`` at once."""
    return win32pipe.CreateNamedPipe(
        path,
        win32pipe.PIPE_ACCESS_DUPLEX,
        win32pipe.PIPE_TYPE_BYTE | win32pipe.PIPE_READMODE_BYTE | win32pipe.PIPE_WAIT,
        instances,
        65536,
        65536,
        0,
        None,
    )


def echo_until_gone(pipe) -> None:
    """Echo what the connected client writes until it goes, then disconnect the instance."""
    try:
        while True:
            _, data = win32file.ReadFile(pipe, 65536)
            win32file.WriteFile(pipe, data)
    except pywintypes.error:
        pass
    win32pipe.DisconnectNamedPipe(pipe)
