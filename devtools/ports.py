"""Ports for the local servers we start as child processes (DynamoDB Local, Lambda emulators).

Those take a port number on their command line, so the port is picked here and bound there:
another process can take it in between. start() methods therefore retry with a new port when
the child reports a busy address, and count a port as ready only when the child itself listens
on it (an answer on the port could come from whoever took it).
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

BIND_ATTEMPTS = 5
_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on host ("" for every interface) right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def address_in_use(output: str) -> bool:
    """Whether a child's output says it lost a port to another process (Java, Go, Python)."""
    lowered = output.lower()
    return "address already in use" in lowered or "bindexception" in lowered


def listening_ports(pid: int) -> set[int] | None:
    """The TCP ports process pid listens on (Linux /proc), or None where that can't be told."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:  # no /proc, or not our process
        return None
    sockets = set()
    for fd in fds:
        with contextlib.suppress(OSError):  # an fd closed while we read
            sockets.add(os.readlink(fd_dir / fd))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == _LISTEN and f"socket:[{fields[9]}]" in sockets:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def listens(pid: int, port: int) -> bool | None:
    """Whether process pid listens on port; None where /proc can't tell."""
    ports = listening_ports(pid)
    return None if ports is None else port in ports


def serves(pid: int, ports: set[int], probe: int) -> bool:
    """Whether process pid listens on every one of `ports`; where /proc can't tell, whether
    `probe` answers (possibly another process's answer: the best that can be known there)."""
    listened = listening_ports(pid)
    if listened is not None:
        return ports <= listened
    try:
        socket.create_connection(("127.0.0.1", probe), timeout=0.5).close()
    except OSError:
        return False
    return True
