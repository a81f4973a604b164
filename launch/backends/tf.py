"""tf.distribute: one `TF_CONFIG` per worker for `MultiWorkerMirroredStrategy`.

Ports: on this machine the launcher reserves free ports by binding to port 0 (and
releases them just before starting the workers); in simulated hosts (fresh network
namespaces) every port is free, so ranks use `SIMULATED_BASE_PORT + local_rank`;
for remote hosts the launcher can only guess with its own free ports.
"""

import os
import socket

from launch.backends.common import rank_workers
from launch.environment import tf_config

SIMULATED_BASE_PORT = 20000


def free_ports(count, address="127.0.0.1"):
    """`count` distinct ports that were free on `address` a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((address, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def worker_addresses(placement):
    """`host:port` of every rank, indexed by rank."""
    if placement.shared_machine:
        ports = [SIMULATED_BASE_PORT + slot.local_rank for slot in placement.slots]
    else:
        ports = free_ports(len(placement.slots))
    return [f"{placement.addresses[slot.hostname]}:{port}"
            for slot, port in zip(placement.slots, ports)]


class TfBackend:
    name = "tf"

    def __init__(self, options):
        del options

    def workers(self, placement):
        addresses = worker_addresses(placement)
        return rank_workers(
            placement, lambda slot: {"TF_CONFIG": tf_config(slot.rank, addresses)}, os.environ
        )

    def close(self):
        pass
