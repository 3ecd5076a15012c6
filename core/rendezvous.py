"""Rendezvous stores that listen only where they are told.

``torch.distributed.TCPStore(host, port, is_master=True)`` listens on every interface whatever ``host`` says (it
binds ``::``), so a learner on a laptop or a pod opened its rendezvous port to the whole network. The master
here binds its socket to ``host`` itself and hands it to the store (``master_listen_fd``, libuv backend); the
members connect as before. gloo's own sockets follow ``GLOO_SOCKET_IFNAME``, which ``loopback_interface`` names
for a local run."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket

import torch.distributed as dist


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one) and listening; IPv4 or IPv6 as ``host`` is."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise OSError(f"rendezvous store: cannot listen on {host}:{port}: {exc}") from exc
    return sock


def tcp_store(host: str, port: int, world_size: int, is_master: bool,
              timeout: datetime.timedelta) -> dist.TCPStore:
    """The group's store on ``host:port``: the master listens on ``host`` only; a member connects to it."""
    if not is_master:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    sock = listening_socket(host, port)
    bound_port, fd = sock.getsockname()[1], sock.detach()  # the store owns the descriptor from here
    try:
        return dist.TCPStore(host, bound_port, world_size, is_master=True, timeout=timeout, master_listen_fd=fd,
                             use_libuv=True)
    except BaseException:
        with contextlib.suppress(OSError):  # the store may have closed it already
            os.close(fd)
        raise


def loopback_interface(host: str) -> str | None:
    """The name of the network interface that holds ``host`` when it is a loopback address (``lo`` on Linux), for
    ``GLOO_SOCKET_IFNAME``; None for any other address (gloo then binds the machine's own, as on a cluster)."""
    import psutil

    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return None
    if not all(a.startswith("127.") or a == "::1" for a in addresses):
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address in addresses for a in addrs):
            return name
    return None
