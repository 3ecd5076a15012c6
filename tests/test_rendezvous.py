"""Rendezvous stores listen on the address they are given, never on every interface (torch's default)."""

from __future__ import annotations

import datetime
import socket
import threading

import psutil
import pytest
import torch.distributed as dist

from core.rendezvous import listening_socket, loopback_interface, tcp_store

TIMEOUT = datetime.timedelta(seconds=10)


def _listening_ports() -> dict[int, str]:
    return {c.laddr.port: c.laddr.ip for c in psutil.Process().net_connections("tcp")
            if c.status == psutil.CONN_LISTEN}


def test_torchs_own_store_listens_on_every_interface_and_ours_on_the_address_given():
    plain = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=TIMEOUT)  # why this module exists
    assert _listening_ports()[plain.port] in ("::", "0.0.0.0")
    with listening_socket("127.0.0.1", 0) as free:
        port = free.getsockname()[1]
    members = {}
    joining = threading.Thread(target=lambda: members.setdefault(1, tcp_store("127.0.0.1", port, 2, False, TIMEOUT)))
    joining.start()
    ours = tcp_store("127.0.0.1", port, 2, True, TIMEOUT)  # returns once the member joined
    joining.join()
    assert _listening_ports()[port] == "127.0.0.1"
    ours.set("weights", "v3")
    assert members[1].get("weights") == b"v3"


def test_a_busy_port_is_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            listening_socket("127.0.0.1", port)


def test_gloo_is_pinned_to_the_loopback_interface_only_for_a_loopback_address():
    name = loopback_interface("127.0.0.1")
    assert name is not None and "127.0.0.1" in {a.address for a in psutil.net_if_addrs()[name]}
    assert loopback_interface("localhost") == name
    assert loopback_interface("192.0.2.1") is None  # a cluster address: gloo binds the machine's own
