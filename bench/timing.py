"""Round-robin timing shared by the benchmarks."""

import time


def time_round_robin(functions, rounds, repeat, warmup=2, before_each=None):
    """Name -> list of per-round seconds per call, the functions interleaved.

    Each round runs every function `repeat` times, in an order rotated from
    round to round so that none always runs first (caches, clock frequency);
    a ratio of two functions' samples of the same round is then a paired
    comparison. `before_each` (e.g. a barrier between ranks) runs before every
    sample, outside the timed part.
    """
    for function in functions.values():
        for _ in range(warmup):
            function()
    samples = {name: [] for name in functions}
    names = list(functions)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if before_each is not None:
                before_each()
            start = time.perf_counter()
            for _ in range(repeat):
                functions[name]()
            samples[name].append((time.perf_counter() - start) / repeat)
    return samples
