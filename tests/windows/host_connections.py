"""A host with thousands of loopback TCP connections that keep growing (run on Linux).

``python host_connections.py HELD GROWTH RATE`` opens HELD connections to a
listener of its own on 127.0.0.1, prints ``holding HELD``, then opens GROWTH
more, RATE a second, and keeps them all until it is ended: the table of
connections of a host running a benchmark.  A child process accepts and
holds the other ends (one descriptor per connection in each process) and
dies with its parent.  Not collected by pytest.
"""

import ctypes
import os
import resource
import signal
import socket
import sys
import time

PR_SET_PDEATHSIG = 1

held, growth, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = held + growth + 64
if hard != resource.RLIM_INFINITY and hard < want:
    sys.exit(f"host_connections: needs {want} open files, the hard limit is {hard}")
resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(4096)
address = listener.getsockname()
if os.fork() == 0:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(0)
    accepted = []
    while True:
        accepted.append(listener.accept()[0])
listener.close()

connections = [socket.create_connection(address) for _ in range(held)]
print(f"holding {held}", flush=True)
for _ in range(growth):
    connections.append(socket.create_connection(address))
    time.sleep(1 / rate)
print(f"holding {held + growth}", flush=True)
while True:
    time.sleep(3600)
