"""Alpha-beta model of sync BN's per-step communication for ResNet-50, 8 to 4096 GPUs.

A model, not a measurement. Per training step, every one of ResNet-50's 53
BN layers makes 2 all-reduces (syncbn's packing):

* forward: count and sums, `2C + 1` float64 values = `8(2C + 1)` bytes;
* backward: two gradient sums, `2C` float32 values = `8C` bytes.

They run one after another (each layer needs its statistics before it can
go on), so the step pays the sum of the 106 collective times, and small
messages make that latency-bound. One all-reduce of `n` bytes on `p` GPUs,
`alpha` the per-message latency of a link, `beta` its seconds per byte:

* ring: `2(p-1) alpha + 2(p-1)/p n beta`. Across nodes every ring step has a
  hop over InfiniBand, so all `2(p-1)` latencies are IB ones.
* tree (NCCL's double binary tree across nodes, a tree inside the node):
  `2 log2(g) alpha_nvlink + 2 n beta_nvlink` inside a node of `g` GPUs, plus
  `2 log2(nodes) alpha_ib + 2 n beta_ib` across nodes (the pipelining that
  halves NCCL's bandwidth term is ignored: bandwidth is negligible here).

With `group_size=8` (one node), every collective stays on NVLink: its cost is
the intra-node term, whatever the number of GPUs.

Not modelled: kernel-launch and framework overheads per collective (add them
with `--overhead-us`; Horovod adds its cycle time, 1 ms by default, see
bench/sync_step.py), overlap with computation (there is none to hide behind:
the next layer waits), congestion and topology beyond one switch level.

The 53 channel counts are hard-coded from the architecture (He et al. 2016;
`keras.applications.ResNet50`'s bottleneck blocks 3, 4, 6, 3); `--check-keras`
builds the Keras model (weights=None) and checks the list against it.

    python bench/scaling_model.py
    python bench/scaling_model.py --alpha-ib-us 5 --step-ms 100 --json scaling.json
"""

import argparse
import json
import math
import shlex
import sys

GPU_COUNTS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def resnet50_bn_channels():
    """The 53 BN layers' channel counts, in the order of Keras's `model.layers`."""
    channels = [64]  # conv1_bn
    for filters, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            channels += [filters, filters]  # _1_bn, _2_bn
            if block == 0:
                channels.append(4 * filters)  # _0_bn, the projection shortcut's
            channels.append(4 * filters)  # _3_bn
    return channels


def keras_resnet50_bn_channels():
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    model = keras.applications.ResNet50(weights=None)
    return [layer.gamma.shape[0] for layer in model.layers
            if isinstance(layer, keras.layers.BatchNormalization)]


def packet_bytes(channels):
    """Bytes of every collective of one step, in order: forward then backward per layer."""
    sizes = []
    for c in channels:
        sizes.append(8 * (2 * c + 1))  # [C] + [C] + [1] float64
    for c in reversed(channels):
        sizes.append(8 * c)  # [C] + [C] float32
    return sizes


def ring_seconds(p, n, alpha, beta):
    if p == 1:
        return 0.0
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta


def tree_seconds(p, n, alpha, beta):
    if p == 1:
        return 0.0
    return 2 * math.ceil(math.log2(p)) * alpha + 2 * n * beta


def allreduce_seconds(algorithm, gpus, n, links, gpus_per_node):
    nvlink, ib = links["nvlink"], links["ib"]
    local = min(gpus, gpus_per_node)
    nodes = max(1, gpus // gpus_per_node)
    if algorithm == "ring":
        if nodes == 1:
            return ring_seconds(local, n, *nvlink)
        # Every one of the 2(p-1) ring steps waits for an IB hop.
        return ring_seconds(gpus, n, *ib)
    return tree_seconds(local, n, *nvlink) + tree_seconds(nodes, n, *ib)


def step_milliseconds(algorithm, gpus, sizes, links, gpus_per_node, overhead):
    return 1e3 * sum(allreduce_seconds(algorithm, gpus, n, links, gpus_per_node) + overhead
                     for n in sizes)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha-nvlink-us", type=float, default=5.0,
                        help="NVLink latency per message, us (default 5)")
    parser.add_argument("--bandwidth-nvlink-gbs", type=float, default=150.0,
                        help="NVLink bandwidth per GPU, GB/s (default 150)")
    parser.add_argument("--alpha-ib-us", type=float, default=7.5,
                        help="InfiniBand HDR latency per message, us (default 7.5, of 5-10)")
    parser.add_argument("--bandwidth-ib-gbs", type=float, default=25.0,
                        help="InfiniBand HDR bandwidth per node, GB/s (default 25)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="default 8")
    parser.add_argument("--overhead-us", type=float, default=0.0,
                        help="software overhead added to every collective, us (default 0)")
    parser.add_argument("--step-ms", type=float, default=100.0,
                        help="ResNet-50 step time to compare with, ms (default 100: A100, "
                             "mixed precision, 256 images per GPU at ~2,600 images/s)")
    parser.add_argument("--check-keras", action="store_true",
                        help="build keras.applications.ResNet50 and check the channel list")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    channels = resnet50_bn_channels()
    if args.check_keras:
        from_keras = keras_resnet50_bn_channels()
        if from_keras != channels:
            raise SystemExit(f"hard-coded channels differ from Keras's: {from_keras}")
    links = {
        "nvlink": (args.alpha_nvlink_us * 1e-6, 1.0 / (args.bandwidth_nvlink_gbs * 1e9)),
        "ib": (args.alpha_ib_us * 1e-6, 1.0 / (args.bandwidth_ib_gbs * 1e9)),
    }
    sizes = packet_bytes(channels)
    overhead = args.overhead_us * 1e-6
    group = args.gpus_per_node

    print("command: python " + shlex.join(sys.argv))
    source = ("checked against keras.applications.ResNet50" if args.check_keras
              else "hard-coded from the architecture")
    print(f"ResNet-50: {len(channels)} BN layers, {sum(channels)} channels in all ({source}); "
          f"{len(sizes)} sequential all-reduces and {sum(sizes):,} bytes per step per GPU")
    print(f"assumptions: NVLink alpha {args.alpha_nvlink_us:g} us, {args.bandwidth_nvlink_gbs:g} GB/s; "
          f"InfiniBand HDR alpha {args.alpha_ib_us:g} us, {args.bandwidth_ib_gbs:g} GB/s; "
          f"{group} GPUs per node; {args.overhead_us:g} us software overhead per collective; "
          f"ring = 2(p-1) alpha + 2(p-1)/p n beta (IB alpha once the ring spans nodes); "
          f"tree = 2 log2(g) alpha_nvlink + 2 log2(nodes) alpha_ib + 2 n (beta_nvlink + beta_ib); "
          f"collectives sequential, no overlap; step compared with {args.step_ms:g} ms")
    print()
    print(f"| GPUs | nodes | tree, all GPUs ms | ring, all GPUs ms | group_size={group}, tree ms "
          f"| group_size={group}, ring ms | tree / step | group_size={group} tree / step |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for gpus in GPU_COUNTS:
        row = {
            "gpus": gpus,
            "nodes": max(1, gpus // group),
            "tree_ms": step_milliseconds("tree", gpus, sizes, links, group, overhead),
            "ring_ms": step_milliseconds("ring", gpus, sizes, links, group, overhead),
            "group_tree_ms": step_milliseconds("tree", min(gpus, group), sizes, links, group, overhead),
            "group_ring_ms": step_milliseconds("ring", min(gpus, group), sizes, links, group, overhead),
        }
        rows.append(row)
        print(f"| {gpus} | {row['nodes']} | {row['tree_ms']:.2f} | {row['ring_ms']:.1f} "
              f"| {row['group_tree_ms']:.2f} | {row['group_ring_ms']:.2f} "
              f"| {row['tree_ms'] / args.step_ms:.1%} | {row['group_tree_ms'] / args.step_ms:.1%} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": sys.argv, "assumptions": vars(args), "channels": channels,
                       "bytes_per_step": sum(sizes), "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
