"""PNG plots where a picture beats a table."""
from __future__ import annotations

from pathlib import Path


def plot_alpha_per_position(series: dict[str, list[float]], path: str | Path, title: str = "") -> Path:
    """One line per label: acceptance rate at each draft position (given the earlier ones accepted)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, alphas in series.items():
        positions = list(range(1, len(alphas) + 1))
        ax.plot(positions, alphas, marker="o", label=label)
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate (alpha)")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, max((len(a) for a in series.values()), default=1) + 1))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "acceptance per draft position")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
