"""The statistics and plots of ``trl-rb study``: every interval resamples seeds (the unit a user re-runs).

Per arm (trainer) of the study, from the runs' ``eval.json`` (test reward, eval KL by the RB estimate) and
``metrics.jsonl`` (training curves):

- frontier share: the share of the arm's Pareto frontier (reward against eval KL, all runs of the arm) held by each
  method, with a bootstrap 95% interval: seeds are drawn with replacement, each drawn seed bringing all its runs
  (every method and coefficient: the pairing is kept).
- reward at matched KL: for each method, the per-coefficient means (eval KL, reward) over the drawn seeds,
  joined piecewise-linearly in log KL; the RB - other difference at ``kl_levels`` KL values inside the KL range both
  methods cover (no extrapolation; a draw whose curves do not reach a level is left out of that level's interval).
- stability: mean and standard deviation over seeds of the final reward and eval KL, per method and coefficient.
- levelling: per method and coefficient, the mean training reward over the last eighth of the steps minus the
  eighth before it (mean +- SE over seeds): how much the reward was still rising at the end.
- gamma: per coefficient, the γ the RB runs trained with (``kl/gamma``) and the batch estimate of their gradient
  variance against MC's (``kl/var_ratio_vs_mc``), over the second half of the steps (mean over steps, then mean +- SE
  over seeds; the ratio's per-run value is the median over steps).
- gradient noise (from ``trl-rb study``'s measurements): per checkpoint, per-batch variance of the gradient.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..stats import mean_se
from .pareto import RunPoint, load_points

__all__ = [
    "dominated",
    "frontier_share_interval",
    "gamma_in_use",
    "levelling",
    "matched_kl_differences",
    "stability",
    "write_report",
]

GAMMA_KEYS = ("kl/gamma", "kl/var_ratio_vs_mc")

_COLORS = {"RB": "tab:blue", "MC": "tab:orange", "K3": "tab:green"}


def dominated(kl: np.ndarray, reward: np.ndarray) -> np.ndarray:
    """[n] bool: point i has another with KL <= and reward >= (one strictly), as ``pareto.frontier`` decides."""
    le, ge = kl[None, :] <= kl[:, None], reward[None, :] >= reward[:, None]
    strict = (kl[None, :] < kl[:, None]) | (reward[None, :] > reward[:, None])
    return (le & ge & strict).any(axis=1)


def _seed_draws(seeds: list[int], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(np.asarray(seeds), size=(n_boot, len(seeds)), replace=True)


def _share(points: list[RunPoint], method: str) -> float:
    kl = np.array([p.kl for p in points])
    reward = np.array([p.reward for p in points])
    front = ~dominated(kl, reward)
    return float(np.mean([p.method == method for p, on in zip(points, front, strict=True) if on]))


def frontier_share_interval(points: list[RunPoint], draws: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per method: its share of the frontier on all points, and the 2.5/97.5 percentiles over the seed draws."""
    by_seed = {s: [p for p in points if p.seed == s] for s in {p.seed for p in points}}
    out = {}
    for method in sorted({p.method for p in points}):
        boot = [_share([p for s in draw for p in by_seed[s]], method) for draw in draws]
        out[method] = {"share": _share(points, method), "ci95": _percentiles(boot)}
    return out


def _percentiles(values: list[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [float("nan"), float("nan")]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def _curve(points: list[RunPoint], method: str, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log mean KL, mean reward) per coefficient over ``seeds`` (with repeats), sorted by KL."""
    table = {(p.beta, p.seed): p for p in points if p.method == method}
    betas = sorted({b for b, _ in table})
    kl = np.array([np.mean([table[b, s].kl for s in seeds]) for b in betas])
    reward = np.array([np.mean([table[b, s].reward for s in seeds]) for b in betas])
    order = np.argsort(kl)
    return np.log(kl[order]), reward[order]


def _at(curve: tuple[np.ndarray, np.ndarray], log_kl: float) -> float:
    x, y = curve
    return float(np.interp(log_kl, x, y)) if x[0] <= log_kl <= x[-1] else float("nan")


def matched_kl_differences(points: list[RunPoint], draws: np.ndarray, levels: int) -> dict[str, Any]:
    """Reward of each method at ``levels`` KL values and the RB - other differences, with bootstrap intervals."""
    methods = sorted({p.method for p in points})
    seeds = np.array(sorted({p.seed for p in points}))
    full = {m: _curve(points, m, seeds) for m in methods}
    low, high = max(c[0][0] for c in full.values()), min(c[0][-1] for c in full.values())
    if low >= high:
        return {"levels": [], "note": "the methods' KL ranges do not overlap"}
    grid = [low + (high - low) * (i + 1) / (levels + 1) for i in range(levels)]
    boot = [{m: _curve(points, m, draw) for m in methods} for draw in draws]
    rows = []
    for log_kl in grid:
        row: dict[str, Any] = {"kl": math.exp(log_kl), "reward": {m: _at(full[m], log_kl) for m in methods}}
        for other in [m for m in methods if m != "RB"] if "RB" in methods else []:
            diffs = [_at(b["RB"], log_kl) - _at(b[other], log_kl) for b in boot]
            row[f"RB-{other}"] = {"difference": row["reward"]["RB"] - row["reward"][other], "ci95": _percentiles(diffs),
                                  "draws_used": int(sum(math.isfinite(d) for d in diffs))}  # fmt: skip
        rows.append(row)
    return {"levels": rows}


def stability(points: list[RunPoint]) -> list[dict[str, Any]]:
    """Per method and coefficient: seeds, mean and standard deviation (over seeds) of final reward and eval KL."""
    rows = []
    for beta in sorted({p.beta for p in points}):
        for method in sorted({p.method for p in points}):
            mine = [p for p in points if p.beta == beta and p.method == method]
            reward, kl = np.array([p.reward for p in mine]), np.array([p.kl for p in mine])
            rows.append({"beta": beta, "method": method, "seeds": len(mine),
                         "reward_mean": float(reward.mean()), "reward_sd": float(reward.std(ddof=1)),
                         "kl_mean": float(kl.mean()), "kl_sd": float(kl.std(ddof=1))})  # fmt: skip
    return rows


def _training_curves(runs_dir: Path, points: list[RunPoint], keys: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    """Metric -> run name -> [steps] array of the logged training metrics ``keys`` (e.g. ``reward``, ``kl/rb``);
    each run's metrics.jsonl is read once."""
    curves: dict[str, dict[str, np.ndarray]] = {key: {} for key in keys}
    for p in points:
        rows = [json.loads(line) for line in (runs_dir / p.name / "metrics.jsonl").read_text().splitlines() if line]
        rows = [r for r in rows if "step" in r and "train_runtime" not in r]
        for key in keys:
            curves[key][p.name] = np.array([r[key] for r in rows if key in r])
    return curves


def levelling(points: list[RunPoint], rewards: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per method and coefficient: training reward in the last eighth of the steps minus the eighth before it,
    and the total rise (last eighth minus first eighth), mean +- SE over seeds."""
    rows = []
    for beta in sorted({p.beta for p in points}):
        for method in sorted({p.method for p in points}):
            late, total = [], []
            for p in (q for q in points if q.beta == beta and q.method == method):
                r = rewards[p.name]
                w = max(1, len(r) // 8)
                late.append(r[-w:].mean() - r[-2 * w : -w].mean())
                total.append(r[-w:].mean() - r[:w].mean())
            rows.append({"beta": beta, "method": method, "window_steps": w, "last_rise": mean_se(late),
                         "total_rise": mean_se(total)})  # fmt: skip
    return rows


def gamma_in_use(points: list[RunPoint], curves: dict[str, dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """Per coefficient, over the RB runs that log ``kl/gamma``: the mean γ of the second half of the steps, γ / beta,
    and the median logged variance ratio against MC over the same steps (each mean +- SE over seeds)."""
    rows = []
    for beta in sorted({p.beta for p in points}):
        gammas, ratios = [], []
        for p in (q for q in points if q.beta == beta and q.method == "RB"):
            gamma, ratio = curves["kl/gamma"][p.name], curves["kl/var_ratio_vs_mc"][p.name]
            if gamma.size:
                gammas.append(gamma[gamma.size // 2 :].mean())
            if ratio.size:
                ratios.append(np.median(ratio[ratio.size // 2 :]))
        if gammas:
            rows.append({"beta": beta, "gamma": mean_se(gammas), "gamma_over_beta": mean_se([g / beta for g in gammas]),
                         "logged_variance_ratio": mean_se(ratios) if ratios else None})  # fmt: skip
    return rows



def _plot_pareto(arms: dict[str, list[RunPoint]], report: dict, png: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(arms), figsize=(6.5 * len(arms), 5), squeeze=False)
    for ax, (trainer, points) in zip(axes[0], arms.items(), strict=True):
        for method in sorted({p.method for p in points}):
            mine = [p for p in points if p.method == method]
            ax.scatter([p.kl for p in mine], [p.reward for p in mine], s=14, alpha=0.35, color=_COLORS.get(method))
            share = report[trainer]["frontier_share"][method]
            for beta in sorted({p.beta for p in mine}):
                kl, reward = np.array([p.kl for p in mine if p.beta == beta]), np.array([p.reward for p in mine if p.beta == beta])
                ax.errorbar(kl.mean(), reward.mean(), xerr=1.96 * kl.std(ddof=1) / math.sqrt(kl.size),
                            yerr=1.96 * reward.std(ddof=1) / math.sqrt(reward.size), fmt="o", ms=7, capsize=3,
                            color=_COLORS.get(method), mec="black")  # fmt: skip
            ax.plot([], [], "o", color=_COLORS.get(method),
                    label=f"{method}: {share['share']:.0%} of frontier [{share['ci95'][0]:.0%}, {share['ci95'][1]:.0%}]")  # fmt: skip
        kl, reward = np.array([p.kl for p in points]), np.array([p.reward for p in points])
        front = ~dominated(kl, reward)
        order = np.argsort(kl[front])
        ax.step(kl[front][order], reward[front][order], where="post", color="black", lw=1, label="frontier (all runs)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("eval KL(policy || reference) per sequence, RB estimate (test prompts)")
        ax.set_ylabel("eval reward (test prompts)")
        ax.set_title(f"{trainer.upper()}: {len(points)} runs; large points: mean over seeds per beta, 95% CI")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _plot_curves(arms: dict[str, list[RunPoint]], curves: dict[str, dict[str, dict[str, np.ndarray]]], png: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(arms), figsize=(6.5 * len(arms), 7), sharex=True, squeeze=False)
    styles = ("-", "--", ":", "-.")
    for col, (trainer, points) in enumerate(arms.items()):
        betas = sorted({p.beta for p in points})
        for row, key in enumerate(("reward", "kl/rb")):
            ax = axes[row][col]
            for method in sorted({p.method for p in points}):
                for i, beta in enumerate(betas):
                    runs = [curves[trainer][key][p.name] for p in points if p.method == method and p.beta == beta]
                    n = min(len(r) for r in runs)
                    mean = np.mean([np.convolve(r[:n], np.ones(20) / 20, mode="valid") for r in runs], axis=0)
                    ax.plot(np.arange(len(mean)) + 20, mean, color=_COLORS.get(method), ls=styles[i % 4], lw=1.2,
                            label=f"{method}, beta {beta:g}")  # fmt: skip
            ax.set_ylabel("training reward" if key == "reward" else "training KL (kl/rb) per sequence")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{trainer.upper()}: mean over seeds (20-step moving average)")
                ax.legend(fontsize=7, ncol=2)
            else:
                ax.set_xlabel("training step")
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _fmt(pair: list[float], digits: int = 3) -> str:
    return f"{pair[0]:.{digits}f} +- {pair[1]:.{digits}f}"


def _markdown(report: dict) -> str:
    lines = []
    for trainer, part in report["arms"].items():
        lines += [f"## {trainer.upper()}", "", f"{part['runs']} runs: methods {part['methods']}, coefficients "
                  f"{part['kl_coefs']}, seeds {part['seeds']}; {part['max_steps']} steps each, mean training time "
                  f"{part['mean_train_seconds']:.0f} s per run.", ""]  # fmt: skip
        lines += ["| method | share of the frontier | 95% interval (seeds resampled) |", "|---|---|---|"]
        for m, s in part["frontier_share"].items():
            lines.append(f"| {m} | {s['share']:.0%} | [{s['ci95'][0]:.0%}, {s['ci95'][1]:.0%}] |")
        lines += ["", "Reward at matched eval KL (interpolated between coefficients in log KL):", ""]
        other = [m for m in part["methods"] if m != "RB"]
        head = "| eval KL | " + " | ".join(f"reward {m}" for m in part["methods"])
        lines += [head + "".join(f" | RB - {o} | 95% interval" for o in other) + " |",
                  "|---" * (1 + len(part["methods"]) + 2 * len(other)) + "|"]  # fmt: skip
        for row in part["matched_kl"].get("levels", []):
            cells = [f"{row['kl']:.3f}"] + [f"{row['reward'][m]:.3f}" for m in part["methods"]]
            for o in other:
                d = row[f"RB-{o}"]
                cells += [f"{d['difference']:+.3f}", f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Stability over seeds and levelling of the training reward:", "",
                  "| beta | method | reward mean | reward sd | eval KL mean | eval KL sd | reward rise, last "
                  f"{part['levelling'][0]['window_steps']} steps | total rise |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for s, lv in zip(part["stability"], part["levelling"], strict=True):
            lines.append(f"| {s['beta']:g} | {s['method']} | {s['reward_mean']:.3f} | {s['reward_sd']:.3f} | "
                         f"{s['kl_mean']:.3f} | {s['kl_sd']:.3f} | {_fmt(lv['last_rise'])} | {_fmt(lv['total_rise'])} |")  # fmt: skip
        if part.get("gamma"):
            lines += ["", "The γ in use (second half of the steps; `kl/gamma`) and the logged batch estimate of the RB / MC "
                      "gradient variance (`kl/var_ratio_vs_mc`):", "", "| beta | γ | γ / beta | logged variance ratio |",
                      "|---|---|---|---|"]  # fmt: skip
            for g in part["gamma"]:
                ratio = _fmt(g["logged_variance_ratio"]) if g["logged_variance_ratio"] else "–"
                lines.append(f"| {g['beta']:g} | {_fmt(g['gamma'])} | {_fmt(g['gamma_over_beta'], 2)} | {ratio} |")
        noise = report.get("noise", {}).get(trainer)
        if noise:
            lines += ["", f"Gradient noise at learning rate 0 ({noise[0]['batches']} batches of the same completions "
                      f"per method; run {noise[0]['run']}):", "",
                      "| step | method | mean-gradient norm | per-batch variance (trace) | noise / signal |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for n in noise:
                for m, v in n["methods"].items():
                    lines.append(f"| {n['step']} | {m} | {v['mean_grad_norm']:.4g} | {v['variance_trace']:.4g} | "
                                 f"{v['noise_to_signal']:.3g} |")  # fmt: skip
            lines.append("")
            for n in noise:
                for o, v in n["vs_rb"].items():
                    lines.append(f"- step {n['step']}: variance RB / {o} = {v['variance_ratio_rb_over']:.3f} "
                                 f"[{v['variance_ratio_ci95'][0]:.3f}, {v['variance_ratio_ci95'][1]:.3f}] (bootstrap "
                                 f"over batches), cosine of the mean gradients {v['cosine_of_means']:.3f}, largest "
                                 f"batch-reward difference {v['max_batch_reward_difference']:.2g}")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def write_report(config: Any, noise: dict[str, list[dict]]) -> dict[str, Any]:
    """Compute every statistic of the study in ``config.sweep.output_dir``; write study.json, study.md and the two
    PNGs there; return the report."""
    runs_dir = config.sweep.output_dir
    points = load_points(runs_dir)
    rng = np.random.default_rng(0)
    arms, curves, report = {}, {}, {"arms": {}, "noise": noise}
    for arm in config.sweep.arms:
        mine = [p for p in points if p.trainer == arm.trainer and p.method in arm.methods and p.beta in arm.kl_coefs
                and p.seed in config.sweep.seeds]  # fmt: skip
        if not mine:
            continue
        seeds = sorted({p.seed for p in mine})
        complete = [s for s in seeds if sum(p.seed == s for p in mine) == len(arm.methods) * len(arm.kl_coefs)]
        mine = [p for p in mine if p.seed in complete]  # pairing needs every run of a seed
        if len(complete) < 2:
            continue
        draws = _seed_draws(complete, config.bootstrap, rng)
        arms[arm.trainer] = mine
        curves[arm.trainer] = _training_curves(runs_dir, mine, ("reward", "kl/rb", *GAMMA_KEYS))
        train_seconds = [json.loads((runs_dir / p.name / "eval.json").read_text())["train_seconds"] for p in mine]
        report["arms"][arm.trainer] = {
            "runs": len(mine), "methods": arm.methods, "kl_coefs": arm.kl_coefs, "seeds": complete,
            "max_steps": config.max_steps, "mean_train_seconds": float(np.mean(train_seconds)),
            "frontier_share": frontier_share_interval(mine, draws),
            "matched_kl": matched_kl_differences(mine, draws, config.kl_levels),
            "stability": stability(mine), "levelling": levelling(mine, curves[arm.trainer]["reward"]),
            "gamma": gamma_in_use(mine, curves[arm.trainer]),
        }  # fmt: skip
    (runs_dir / "study.json").write_text(json.dumps(report, indent=1))
    (runs_dir / "study.md").write_text(_markdown(report))
    if arms:
        _plot_pareto(arms, report["arms"], runs_dir / "study_pareto.png")
        _plot_curves(arms, curves, runs_dir / "study_reward_vs_step.png")
    return report
