r"""``scripts/wine-tier``: the Wine it sets up runs services as Windows does.

Two ``services.exe`` in one wineserver both serve ``\\pipe\svcctl``, each with
its own service database: a service installed through one is "Service does
not exist" through the other, so the service tests would pass or fail by
which of them a connection reached.  And the service manager of the boot
that creates a prefix hands its services an environment without ``PATH``,
on which the relay's service dies at ``import trio``.  And a Windows process
whose heap the kernel happens to place over Wine's shared user data dies before
it runs, so every Windows process runs with address-space randomisation off.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from ..e2e.support import ProcGroup
from .conftest import WineTier, _load_script
from .test_managed import CHECKS, _linux_pids_with

ADDR_NO_RANDOMIZE = 0x0040000


def _service_managers(prefix: Path) -> list[int]:
    """The pids of the live ``services.exe`` processes running in ``prefix``."""
    wanted = f"WINEPREFIX={prefix}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv0 = (proc / "cmdline").read_bytes().split(b"\0", 1)[0].strip()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or a zombie
            continue
        if argv0.lower().endswith(b"\\services.exe") and wanted in environ:
            found.append(int(proc.name))
    return found


def test_the_tiers_wineserver_runs_one_service_manager(wine_tier: WineTier) -> None:
    script = wine_tier._script
    script.start_wineserver()

    assert len(_service_managers(script.PREFIX)) == 1


def test_a_new_prefix_runs_one_service_manager_whose_services_get_a_path(
    wine_tier: WineTier, tmp_path: Path
) -> None:
    script = _load_script()  # a copy of the module, pointed at a prefix of the test's own
    script.PREFIX = tmp_path / "prefix"
    dump = tmp_path / "environment.txt"
    try:
        script.create_prefix()

        assert len(_service_managers(script.PREFIX)) == 1
        # A service that writes its environment out (cmd.exe is no service:
        # the start fails once it has exited, which is after the write).
        sc = [*wine_tier.wine, "sc"]
        program = f"C:\\windows\\system32\\cmd.exe /c set > {script.windows_path(dump)}"
        for args in (["create", "envdump", "binPath=", program], ["start", "envdump"]):
            subprocess.run(
                sc + args,
                env=script.wine_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
                timeout=120,
            )
        names = {line.split("=", 1)[0].upper() for line in dump.read_text().splitlines()}
        assert {"PATH", "SYSTEMROOT", "TEMP"} <= names, names
    finally:
        script.stop_wineserver()


def test_windows_processes_run_without_address_space_randomisation(
    wine_tier: WineTier, tmp_path: Path, procs: ProcGroup
) -> None:
    # With it on, about one Windows process start in 7,000 failed before the
    # process ran (CreateProcess: ERROR_INTERNAL_ERROR): see windows_command in
    # scripts/wine-tier.  Each way a Windows process starts in this tier: the
    # boot (services.exe), a test's python.exe, and what those create, here a
    # managed server (CreateProcessAsUser) and the grandchild it starts.
    token = f"dbgrelay-job-{uuid.uuid4().hex}"
    relay = wine_tier.start(procs, CHECKS, "host", token, cwd=tmp_path, name="relay-host")
    relay.wait_line('"ready"', stream="stdout", timeout=120)
    tree = _linux_pids_with(token)
    services = _service_managers(wine_tier._script.PREFIX)
    assert len(tree) == 3 and len(services) == 1, (tree, services)
    for pid in [*tree, *services]:
        personality = int(Path(f"/proc/{pid}/personality").read_text(), 16)
        assert personality & ADDR_NO_RANDOMIZE, f"process {pid} runs with randomisation on"
