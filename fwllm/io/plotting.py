"""matplotlib without a screen: every plot fwllm writes is a PNG file."""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
