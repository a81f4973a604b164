"""Host lists and rank assignment. Pure: no processes, no network.

The assignment is the one `horovodrun` uses (fill each host's slots in order;
`cross_rank` counts hosts that have the same `local_rank`), so Horovod's
rendezvous server and our per-rank environment agree. A unit test checks that
against `horovod.runner.common.util.hosts.get_host_assignments`.
"""

import dataclasses
import re
import socket

_HOST_ITEM = re.compile(r"^[\w.\-]+:[0-9]+$")

LOCAL_HOST_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})


@dataclasses.dataclass(frozen=True)
class Host:
    """A host name and how many ranks it takes."""

    name: str
    slots: int


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one rank runs, with the same fields as Horovod's `SlotInfo`."""

    hostname: str
    rank: int
    local_rank: int
    cross_rank: int
    size: int
    local_size: int
    cross_size: int


def parse_hosts(spec, argument="-H"):
    """Parses `host1:2,host2:2` into `Host`s.

    Args:
        spec: comma-separated `name:slots` items; slots is a positive integer.
        argument: the option name used in error messages.

    Returns:
        A list of `Host`, in the given order.

    Raises:
        TypeError: if `spec` is not a string.
        ValueError: on an empty spec, a malformed item, zero slots or a repeated host.

    Example:
        >>> parse_hosts("a:2,b:1")
        [Host(name='a', slots=2), Host(name='b', slots=1)]
    """
    if not isinstance(spec, str):
        raise TypeError(
            f"Argument `{argument}` must be a string like 'host1:2,host2:2'. "
            f"Received: {spec!r} of type {type(spec).__name__}"
        )
    hosts = []
    seen = set()
    for item in spec.split(","):
        item = item.strip()
        if not _HOST_ITEM.match(item):
            raise ValueError(
                f"Argument `{argument}` must be comma-separated `name:slots` items, "
                f"like 'host1:2,host2:2'. Received: {spec!r} (bad item {item!r})"
            )
        name, slots = item.rsplit(":", 1)
        if int(slots) < 1:
            raise ValueError(
                f"Argument `{argument}` needs at least 1 slot per host. "
                f"Received: {spec!r} (host {name!r} has {slots} slots)"
            )
        if name in seen:
            raise ValueError(
                f"Argument `{argument}` names host {name!r} twice; give it once with "
                f"the total number of slots. Received: {spec!r}"
            )
        seen.add(name)
        hosts.append(Host(name, int(slots)))
    return hosts


def validate_num_proc(num_proc, hosts, argument="-np"):
    """Checks that `num_proc` is a positive int that fits in the hosts' slots.

    Args:
        num_proc: the number of ranks.
        hosts: list of `Host`, or None for no limit on the slots.
        argument: the option name used in error messages.

    Raises:
        TypeError: if `num_proc` is not an int.
        ValueError: if it is < 1 or exceeds the total number of slots.
    """
    if isinstance(num_proc, bool) or not isinstance(num_proc, int):
        raise TypeError(
            f"Argument `{argument}` must be an integer. Received: {num_proc!r}"
        )
    if num_proc < 1:
        raise ValueError(f"Argument `{argument}` must be >= 1. Received: {argument}={num_proc}")
    if hosts is None:
        return
    total = sum(host.slots for host in hosts)
    if num_proc > total:
        listing = ",".join(f"{h.name}:{h.slots}" for h in hosts)
        raise ValueError(
            f"Argument `{argument}` asks for more processes than there are slots "
            f"({total} in {listing!r}). Received: {argument}={num_proc}"
        )


def assign_ranks(hosts, num_proc):
    """Assigns `num_proc` ranks to the hosts' slots, host by host.

    Args:
        hosts: list of `Host`.
        num_proc: number of ranks; at most the total number of slots.

    Returns:
        A list of `Slot`, indexed by rank. Hosts that get no rank are left out.

    Raises:
        TypeError, ValueError: see `validate_num_proc`.

    Example:
        >>> [(s.hostname, s.rank, s.local_rank, s.cross_rank)
        ...  for s in assign_ranks([Host("a", 2), Host("b", 2)], 3)]
        [('a', 0, 0, 0), ('a', 1, 1, 0), ('b', 2, 0, 1)]
    """
    validate_num_proc(num_proc, hosts)
    per_host = []  # [(host, [ranks])]
    hosts_at_local_rank = {}  # local_rank -> [hostname, ...] in order
    rank = 0
    for host in hosts:
        ranks = []
        for local_rank in range(host.slots):
            if rank == num_proc:
                break
            ranks.append(rank)
            hosts_at_local_rank.setdefault(local_rank, []).append(host.name)
            rank += 1
        if ranks:
            per_host.append((host, ranks))
    slots = []
    for host, ranks in per_host:
        for local_rank, global_rank in enumerate(ranks):
            peers = hosts_at_local_rank[local_rank]
            slots.append(
                Slot(
                    hostname=host.name,
                    rank=global_rank,
                    local_rank=local_rank,
                    cross_rank=peers.index(host.name),
                    size=num_proc,
                    local_size=len(ranks),
                    cross_size=len(peers),
                )
            )
    return slots


def simulated_hosts_spec(num_proc, num_hosts):
    """Spreads `num_proc` ranks over `num_hosts` simulated hosts as evenly as possible.

    Returns:
        A list of slot counts, one per host, e.g. `[2, 2]` for 4 ranks on 2 hosts.

    Raises:
        ValueError: if a host would get no rank (`num_hosts > num_proc`) or `num_hosts < 1`.
    """
    if isinstance(num_hosts, bool) or not isinstance(num_hosts, int):
        raise TypeError(
            f"Argument `--simulate-hosts` must be an integer. Received: {num_hosts!r}"
        )
    if num_hosts < 1:
        raise ValueError(
            f"Argument `--simulate-hosts` must be >= 1. Received: --simulate-hosts={num_hosts}"
        )
    if num_hosts > num_proc:
        raise ValueError(
            f"Argument `--simulate-hosts` must not exceed `-np` ({num_proc}), or some "
            f"hosts would run no rank. Received: --simulate-hosts={num_hosts}"
        )
    base, extra = divmod(num_proc, num_hosts)
    return [base + (1 if i < extra else 0) for i in range(num_hosts)]


def is_local_host(name):
    """True if `name` means this machine (so no ssh is needed)."""
    if name in LOCAL_HOST_NAMES or name.startswith("127."):
        return True
    try:
        return name in {socket.gethostname(), socket.getfqdn()}
    except OSError:
        return False


_TASKS_PER_NODE_ITEM = re.compile(r"^([0-9]+)(?:\(x([0-9]+)\))?$")


def parse_tasks_per_node(spec):
    """Expands Slurm's `SLURM_TASKS_PER_NODE`, e.g. `2(x3),1`, into one count per node. Pure.

    Raises:
        ValueError: on an item that is neither `N` nor `N(xM)`.

    Example:
        >>> parse_tasks_per_node("2(x3),1")
        [2, 2, 2, 1]
    """
    counts = []
    for item in spec.split(","):
        match = _TASKS_PER_NODE_ITEM.match(item.strip())
        if not match:
            raise ValueError(
                "Environment variable `SLURM_TASKS_PER_NODE` must be comma-separated `N` or "
                f"`N(xM)` items, like '2(x3),1'. Received: SLURM_TASKS_PER_NODE={spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def allocation_hosts(node_names, tasks_per_node):
    """The `Host`s of a Slurm allocation: its nodes, in order, with their task counts. Pure.

    Args:
        node_names: the allocation's node names, expanded (`scontrol show hostnames`).
        tasks_per_node: `SLURM_TASKS_PER_NODE` (see `parse_tasks_per_node`).

    Raises:
        ValueError: if the two do not describe the same number of nodes.

    Example:
        >>> allocation_hosts(["n1", "n2"], "2(x2)")
        [Host(name='n1', slots=2), Host(name='n2', slots=2)]
    """
    counts = parse_tasks_per_node(tasks_per_node)
    if len(counts) != len(node_names):
        raise ValueError(
            f"`SLURM_TASKS_PER_NODE` ({tasks_per_node!r}) names {len(counts)} nodes, but the "
            f"allocation has {len(node_names)}: {', '.join(node_names)}")
    return [Host(name, count) for name, count in zip(node_names, counts)]


def node_addresses(text):
    """`{NodeName: NodeAddr}` from `scontrol show node -o` output, one node a line. Pure.

    Example:
        >>> node_addresses("NodeName=n1 Arch=x86_64 NodeAddr=10.0.0.5 NodeHostName=n1\\n")
        {'n1': '10.0.0.5'}
    """
    found = {}
    for line in text.splitlines():
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        if "NodeName" in fields:
            found[fields["NodeName"]] = fields.get("NodeAddr", fields["NodeName"])
    return found
