"""A stand-in managed server for the Windows tier (run by the Windows Python under Wine).

``python managed_server.py PORT TOKEN`` starts a grandchild (a sleeping
Python whose command line carries TOKEN, so the tests can find it from
Linux), listens on 127.0.0.1:PORT and echoes each connection's lines.  The
line ``pids`` answers ``SERVER_PID GRANDCHILD_PID``; ``unlisten`` closes the
listening socket while the server keeps running; ``quit`` ends the server
with status 3 (its grandchild left running).  Not collected by pytest.
"""

import socket
import subprocess
import sys
import threading
import time

port, token = int(sys.argv[1]), sys.argv[2]
grandchild = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(3600)", token],
    stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
listener = socket.socket()
listener.bind(("127.0.0.1", port))
listener.listen()


def serve(conn: socket.socket) -> None:
    with conn, conn.makefile("rwb", buffering=0) as f:
        for line in f:
            if line.strip() == b"pids":
                f.write(f"{os.getpid()} {grandchild.pid}\n".encode())
            elif line.strip() == b"quit":
                os._exit(3)
            elif line.strip() == b"unlisten":
                listener.close()
                f.write(b"closed\n")
            else:
                f.write(line)


import os  # noqa: E402

while True:
    try:
        conn, _ = listener.accept()
    except OSError:
        break
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
while True:
    time.sleep(3600)
