"""The relay as a Windows service (pywin32's service framework, hosted by ``pythonservice.exe``).

``dbgrelay service install --config PATH`` registers the service; the
config's absolute path is kept in the service's registry parameters, so the
service reads the same file ``dbgrelay serve --config PATH`` would.  The
service manager then runs :class:`RelayService`, which runs the relay as
``serve`` does, except:

* a service stop (``dbgrelay service stop``, ``sc stop``, shutdown) starts
  the same graceful drain as Ctrl-C does at a console;
* logs go, as JSON lines, to ``<state_dir>/dbgrelay.log``, and warnings,
  errors and the start and stop to the Application Event Log (source
  ``dbgrelay``), since a service has no console.

Windows only (it imports pywin32).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

import trio

assert sys.platform == "win32"

import servicemanager  # noqa: E402
import win32service  # noqa: E402
import win32serviceutil  # noqa: E402

__all__ = ["RelayService", "install", "remove", "start", "stop", "DEFAULT_NAME"]

DEFAULT_NAME = "dbgrelay"
_CLASS = "relay.winservice.RelayService"
_CONFIG_OPTION = "config"
#: Seconds ``start``/``stop`` wait for the service to get there.
WAIT_TIMEOUT = 60
#: How long the service manager should expect a start to take (ms): loading the
#: config, keys and certificates, then binding the listeners.
START_WAIT_HINT_MS = 30_000


class RelayService(win32serviceutil.ServiceFramework):
    """The relay under the service manager: runs until stopped, then drains."""

    _svc_name_ = DEFAULT_NAME
    _svc_display_name_ = "dbgrelay debug-session relay"
    _svc_description_ = "Authenticated TLS relay for remote debugging sessions"

    def __init__(self, args: list[str]) -> None:
        super().__init__(args)
        # The name this instance was installed under (argv[0] from the SCM).
        self._name = args[0] if args else DEFAULT_NAME
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._stop_requested = False

    def SvcStop(self) -> None:  # noqa: N802 - pywin32's name
        """Called by the service manager on its thread: start the drain."""
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)
        logging.getLogger("dbgrelay.relay").info("relay.stopping", extra={"signal": "service_stop"})
        self._stop_requested = True
        if self._trio_token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._trio_token)
            except trio.RunFinishedError:
                pass

    def SvcRun(self) -> None:  # noqa: N802 - pywin32's name
        """Like pywin32's, except that "running" is reported once the relay listens."""
        self.ReportServiceStatus(win32service.SERVICE_START_PENDING, waitHint=START_WAIT_HINT_MS)
        self.SvcDoRun()
        # The host reports "stopped" when this returns.
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)

    def _ready(self, stop: trio.Event) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        self._stop = stop
        self.ReportServiceStatus(win32service.SERVICE_RUNNING)
        if self._stop_requested:  # the stop came before the relay was up
            stop.set()

    def SvcDoRun(self) -> None:  # noqa: N802 - pywin32's name
        """Run the relay until :meth:`SvcStop`; log to the file and the Event Log."""
        from auth import ensure_private_dir

        from . import cli

        log = logging.getLogger("dbgrelay.relay")
        try:
            config_path = Path(
                win32serviceutil.GetServiceCustomOption(self._name, _CONFIG_OPTION, "")
            )
            config = cli._load_config(config_path)
            for folder in (config.relay.state_dir, config.relay.audit_dir):
                ensure_private_dir(folder)
            _setup_logging(config.relay.state_dir / "dbgrelay.log", self._name)
            servicemanager.LogInfoMsg(f"{self._name}: starting with {config_path}")
            trio.run(
                cli.run_relay_with_stop, config, self._ready, False
            )  # no signals: not the main thread
        except Exception as exc:  # a service has nowhere else to say it
            log.exception("service.failed")
            servicemanager.LogErrorMsg(f"{self._name}: stopped on an error: {exc}")
            raise
        servicemanager.LogInfoMsg(f"{self._name}: stopped")


def _setup_logging(path: Path, name: str) -> None:
    from .cli import JsonFormatter

    root = logging.getLogger()
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(JsonFormatter())
    handlers: list[logging.Handler] = [to_file]
    try:
        to_events = logging.handlers.NTEventLogHandler(name)
    except Exception:  # noqa: BLE001 - the file log still works without it
        logging.getLogger("dbgrelay.relay").warning("service.no_event_log")
    else:
        to_events.setLevel(logging.WARNING)
        to_events.setFormatter(JsonFormatter())
        handlers.append(to_events)
    root.handlers[:] = handlers
    root.setLevel(logging.INFO)


def install(config: Path, *, name: str = DEFAULT_NAME, auto_start: bool = False) -> None:
    """Register the service ``name`` to run the relay on ``config``.

    Raises:
        OSError: the service manager refused (``pywintypes.error`` translated).
    """
    import pywintypes

    try:
        win32serviceutil.InstallService(
            _CLASS,
            name,
            f"{RelayService._svc_display_name_} ({name})"
            if name != DEFAULT_NAME
            else RelayService._svc_display_name_,
            startType=win32service.SERVICE_AUTO_START
            if auto_start
            else win32service.SERVICE_DEMAND_START,
            exeName=win32serviceutil.LocatePythonServiceExe(),
            description=RelayService._svc_description_,
        )
        win32serviceutil.SetServiceCustomOption(name, _CONFIG_OPTION, os.fspath(config.resolve()))
    except pywintypes.error as exc:
        raise OSError(None, exc.strerror, name, exc.winerror) from None


def remove(name: str = DEFAULT_NAME) -> None:
    """Unregister the service (stop it first)."""
    _call(win32serviceutil.RemoveService, name)


def start(name: str = DEFAULT_NAME) -> None:
    """Start the service and wait until the relay listens.

    Raises:
        OSError: it could not be started, or it stopped again at start (a
            bad config, a port in use: the reason is in its log and the
            Event Log).
    """
    _call(win32serviceutil.StartService, name)
    deadline = time.monotonic() + WAIT_TIMEOUT
    while (state := status(name)) != "running":
        if state == "stopped":
            raise OSError(None, "it stopped at start; its log file and the Event Log say why", name)
        if time.monotonic() > deadline:
            raise OSError(None, f"it did not start within {WAIT_TIMEOUT}s", name)
        time.sleep(0.25)


def stop(name: str = DEFAULT_NAME) -> None:
    """Ask the service to stop (the relay drains) and wait until it has."""
    _call(win32serviceutil.StopService, name)
    _call(win32serviceutil.WaitForServiceStatus, name, win32service.SERVICE_STOPPED, WAIT_TIMEOUT)


def status(name: str = DEFAULT_NAME) -> str:
    """``"running"``, ``"stopped"``, ... as the service manager reports it."""
    state = _call(win32serviceutil.QueryServiceStatus, name)[1]
    return {
        win32service.SERVICE_STOPPED: "stopped",
        win32service.SERVICE_START_PENDING: "starting",
        win32service.SERVICE_STOP_PENDING: "stopping",
        win32service.SERVICE_RUNNING: "running",
    }.get(state, str(state))


def _call(function, *args):
    import pywintypes

    try:
        return function(*args)
    except pywintypes.error as exc:
        raise OSError(None, exc.strerror, args[0], exc.winerror) from None
