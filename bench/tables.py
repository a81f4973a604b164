"""Markdown tables shared by the benchmarks."""

import numpy as np


def median_and_ratio_table(samples, names, header, scale=1.0, digits=2):
    """Lines of a table: each name's median (times `scale`) and its median per-round ratio to the first.

    `samples[name]` holds one value per round; the ratio of each round is taken
    before the median, so both sides of a ratio come from the same round.
    """
    base = np.array(samples[names[0]])
    lines = [f"| {header[0]} | {header[1]} | {header[2]} |", "| --- | ---: | ---: |"]
    for name in names:
        values = np.array(samples[name])
        lines.append(f"| {name} | {scale * np.median(values):.{digits}f} | "
                     f"{np.median(values / base):.2f} |")
    return lines
