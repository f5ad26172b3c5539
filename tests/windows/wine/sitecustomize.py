"""Test tier only: makes trio's Windows I/O work under Wine 8.

scripts/wine-tier copies this file into the Windows Python it builds; the
product never ships or imports it.

Wine 8 answers ``WSAIoctl(SIO_BASE_HANDLE)`` and ``SIO_BSP_HANDLE_SELECT``
with WSAEOPNOTSUPP (WinError 10045), so trio cannot find a socket's base
handle for its AFD polling.  Wine has no layered service providers, so the
socket handle is its own base handle: answering with it makes AFD polling
work.  The patch is applied when trio's Windows I/O module is first imported,
so a Python that never imports trio pays nothing.
"""

import importlib.abc
import importlib.machinery
import sys

_TARGET = "trio._core._io_windows"
_WSAEOPNOTSUPP = 10045


def _patch(module):
    original = module._get_underlying_socket

    def get_underlying_socket(sock, *, which=module.WSAIoctls.SIO_BASE_HANDLE):
        try:
            return original(sock, which=which)
        except OSError as exc:
            if exc.winerror != _WSAEOPNOTSUPP:
                raise
            return module._handle(sock.fileno() if hasattr(sock, "fileno") else sock)

    module._get_underlying_socket = get_underlying_socket


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _Finder())
