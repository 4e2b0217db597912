#!/usr/bin/env python3
"""The host's side of the Linux guest's device checks, for scripts/demo (the test suite has its
own in crates/manifold/tests/linux.rs). Run inside the demo's network namespace:

    demo-host.py HOST_ADDR VSOCK_SOCKET SERIAL_LOG REPORT

- answers UDP datagrams on HOST_ADDR:5555 with "manifold-net pong";
- listens on VSOCK_SOCKET_5000 (the guest connects to host port 5000) and answers
  "hello linux" to the guest's line;
- once the guest prints that it listens on vsock port 1234 (in SERIAL_LOG), connects to it
  through VSOCK_SOCKET ("CONNECT 1234") and sends a line, expecting it echoed;
- writes what it saw, one line each, to REPORT.
"""
import os
import socket
import sys
import threading
import time

host_addr, vsock_socket, serial_log, report_path = sys.argv[1:5]
report = open(report_path, "a", buffering=1)


def note(line):
    report.write(line + "\n")


def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host_addr, 5555))
    while True:
        data, peer = s.recvfrom(256)
        s.sendto(b"manifold-net pong", peer)
        note(f"udp: {data.decode(errors='replace')!r} from {peer[0]}")


def vsock_listen():
    path = vsock_socket + "_5000"
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    conn, _ = listener.accept()
    line = conn.makefile("rb").readline()
    conn.sendall(b"hello linux\n")
    note(f"vsock: guest sent {line.decode(errors='replace').strip()!r} to host port 5000")


def vsock_connect():
    while True:
        try:
            with open(serial_log, "rb") as f:
                if b"vsock listening on 1234" in f.read():
                    break
        except FileNotFoundError:
            pass
        time.sleep(1)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(300)
    s.connect(vsock_socket)
    s.sendall(b"CONNECT 1234\n")
    lines = s.makefile("rb")
    ok = lines.readline().decode(errors="replace").strip()
    s.sendall(b"ping from host\n")
    echo = lines.readline().decode(errors="replace").strip()
    note(f"vsock: CONNECT 1234 -> {ok!r}, guest answered {echo!r}")


threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=vsock_listen, daemon=True).start()
vsock_connect()
# The UDP and listener threads keep serving until the demo ends this process.
threading.Event().wait()
