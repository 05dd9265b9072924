"""``trl-rb pareto RUNS_DIR``: eval reward against eval KL for a folder of sentiment runs, with the Pareto frontier.

Reads every ``eval.json`` under RUNS_DIR (written by ``rloo_sentiment.py`` / ``trl-rb sweep``), plots each run's
mean test reward against its KL(policy || reference) measured with the RB estimator, coloured by method, draws the
frontier (the best reward reachable at a given KL budget) and prints which share of the frontier runs each method
holds. The research code's finding: RB runs made 78% of the frontier.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunPoint", "frontier", "frontier_shares", "load_points", "main", "plot_pareto"]

_COLORS = {"RB": "tab:blue", "MC": "tab:orange", "K3": "tab:green"}


@dataclass(frozen=True)
class RunPoint:
    """One run's evaluation: ``kl`` is the RB estimate of KL(policy || reference) per sequence."""

    name: str
    method: str
    reward: float
    kl: float
    reward_se: float = float("nan")
    kl_se: float = float("nan")
    beta: float | None = None
    seed: int | None = None
    trainer: str | None = None
    reference_reward: float | None = None


def load_points(runs_dir: str | os.PathLike, kl_key: str = "kl_rb") -> list[RunPoint]:
    """A RunPoint per ``eval.json`` under ``runs_dir`` (any depth), sorted by run folder name."""
    points = []
    root = Path(runs_dir)
    for path in sorted(root.rglob("eval.json")):
        data = json.loads(path.read_text())
        if "reward" not in data or kl_key not in data:
            raise ValueError(f"{path}: no 'reward' or {kl_key!r} entry; is it an eval.json of rloo_sentiment.py?")
        points.append(
            RunPoint(
                name=str(path.parent.relative_to(root)) if path.parent != root else root.name,
                method=str(data.get("method", "?")).upper(),
                reward=float(data["reward"]),
                kl=float(data[kl_key]),
                reward_se=float(data.get("reward_se", float("nan"))),
                kl_se=float(data.get(f"{kl_key}_se", float("nan"))),
                beta=data.get("beta"),
                seed=data.get("seed"),
                trainer=data.get("trainer"),
                reference_reward=data.get("reference_reward"),
            )
        )
    return points


def frontier(points: list[RunPoint]) -> list[RunPoint]:
    """The non-dominated runs, by increasing KL: no other run has KL <= and reward >= with one of them strict.

    Equivalently, each frontier run has the maximum reward among runs with at most its KL. Exact ties (same KL
    and same reward) are all kept.
    """

    def dominated(a: RunPoint) -> bool:
        return any(
            b.kl <= a.kl and b.reward >= a.reward and (b.kl < a.kl or b.reward > a.reward)
            for b in points
            if b is not a
        )

    return sorted((p for p in points if not dominated(p)), key=lambda p: (p.kl, -p.reward))


def frontier_shares(points: list[RunPoint]) -> dict[str, float]:
    """Share of the frontier runs per method (methods with no frontier run get 0), in [0, 1]."""
    front = frontier(points)
    counts = Counter(p.method for p in front)
    methods = sorted({p.method for p in points})
    return {m: counts.get(m, 0) / len(front) if front else 0.0 for m in methods}


def plot_pareto(points: list[RunPoint], png_path: str | os.PathLike, title: str = "") -> None:
    """Scatter reward vs KL (RB) per run, coloured by method, with error bars and the frontier as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for method in sorted({p.method for p in points}):
        mine = [p for p in points if p.method == method]
        ax.errorbar(
            [p.kl for p in mine],
            [p.reward for p in mine],
            xerr=[0 if p.kl_se != p.kl_se else p.kl_se for p in mine],
            yerr=[0 if p.reward_se != p.reward_se else p.reward_se for p in mine],
            fmt="o",
            ms=6,
            alpha=0.85,
            capsize=2,
            color=_COLORS.get(method),
            label=method,
        )
    front = frontier(points)
    ax.step([p.kl for p in front], [p.reward for p in front], where="post", color="black", lw=1, label="frontier")
    ax.scatter([p.kl for p in front], [p.reward for p in front], s=140, facecolors="none", edgecolors="black")
    refs = [p.reference_reward for p in points if p.reference_reward is not None]
    if refs:
        ax.axhline(sum(refs) / len(refs), color="gray", ls="--", lw=1, label="reference model")
    ax.set_xlabel("KL(policy || reference) per sequence, RB estimate (test prompts)")
    ax.set_ylabel("mean reward (test prompts)")
    ax.set_title(title or "reward vs KL")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".pareto-", suffix=".png", dir=png_path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)


def main(argv: list[str] | None = None) -> int:
    """``trl-rb pareto RUNS_DIR [--output PNG]``: 0 on success, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="trl-rb pareto",
        description="Plot eval reward against eval KL (RB) for every run (eval.json) under RUNS_DIR, with the "
        "Pareto frontier; print the share of frontier runs per method.",
    )
    parser.add_argument("runs_dir", metavar="RUNS_DIR")
    parser.add_argument("--output", default=None, help="PNG path (default: RUNS_DIR/pareto.png)")
    parser.add_argument("--kl", default="rb", choices=["rb", "k1"], help="KL estimate on the x axis (default: rb)")
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        print(f"trl-rb pareto: error: {runs_dir} is not a folder", file=sys.stderr)
        return 2
    try:
        points = load_points(runs_dir, kl_key=f"kl_{args.kl}")
    except (ValueError, OSError) as err:
        print(f"trl-rb pareto: error: {err}", file=sys.stderr)
        return 2
    if not points:
        print(
            f"trl-rb pareto: error: no eval.json under {runs_dir}; run `trl-rb sweep CONFIG` or rloo_sentiment.py "
            "into it first",
            file=sys.stderr,
        )
        return 2
    png = Path(args.output) if args.output else runs_dir / "pareto.png"
    plot_pareto(points, png, title=f"{runs_dir.name}: {len(points)} runs")
    front = frontier(points)
    print(f"{len(points)} runs, {len(front)} on the frontier (reward vs KL {args.kl}):")
    for p in front:
        print(f"  {p.name:<36} {p.method:<3} KL {p.kl:8.4f}  reward {p.reward:7.4f}")
    for method, share in frontier_shares(points).items():
        total = sum(1 for p in points if p.method == method)
        print(
            f"{method}: {share:.0%} of the frontier ({sum(1 for p in front if p.method == method)} of {len(front)}; "
            f"{total} runs)"
        )
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
