"""matplotlib for the benchmarks' plots, headless, or None (with a hint) where the [bench] extra is not installed."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None after saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install -e '.[bench]' (matplotlib)")
        return None
    return plt
