"""eval.py's statistics and reports: Wilson intervals, the exact McNemar test, the paired bootstrap, exact power and
the minimum detectable effect; the markdown tables, results.json/csv and the curves against training FLOPs. It leaves
out what is measured (eval.py) and how; the methods and their checks: docs/eval.md (detail #N = its list).
"""
import csv
import json
import math
import os
from functools import lru_cache
from statistics import NormalDist
from typing import Optional

import numpy as np

from common import fail

Z95 = NormalDist().inv_cdf(0.975)
CURVES = ("success", "per-step accuracy", "recognition", "reward / episode")  # the curves' panels
MEANS = ("reward / episode", "reward / answer", "first answer: target distance")  # measures that are not rates

# The paper's numbers, protocol.md §8 (Init / RL / SFT after equal compute). GP = success, V-IRL = per-step accuracy
# for rule-OOD and route success for visual-OOD.
PAPER = {
    ("gp-l", "rule-ood", "success"): (11.5, 15.0, 3.4),
    ("virl-l", "rule-ood", "per-step accuracy"): (80.8, 91.8, 1.3),
    ("gp-vl", "rule-ood", "success"): (11.2, 14.2, 5.6),
    ("virl-vl", "rule-ood", "per-step accuracy"): (35.7, 45.0, 2.5),
    ("gp-vl", "visual-ood", "success"): (23.6, 41.2, 13.7),
    ("virl-vl", "visual-ood", "success"): (16.7, 77.8, 11.1),
}


# ---- Statistics ----
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial rate k/n (stays inside [0, 1], sane at k = 0 or k = n)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, center - half), 1.0 if k == n else min(1.0, center + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar test: b, c = discordant pairs; p = P(Binomial(b+c, 1/2) as extreme as min(b, c))."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(num_a, den_a, num_b, den_b, samples: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Difference B - A of ratio metrics sum(num)/sum(den) over the same episodes; resamples episodes (pairs) with
    replacement. Success: num = success, den = 1. Per-step accuracy: num = correct steps, den = steps; den = 0: not
    measurable in that episode. num_a = den_a = None: B's own value and interval (one sample).
    Returns (observed difference, 2.5 %, 97.5 % percentile)."""
    if num_a is None:
        num_a, den_a = np.zeros(len(num_b)), np.ones(len(num_b))
    num_a, den_a, num_b, den_b = (np.asarray(x, dtype=np.float64) for x in (num_a, den_a, num_b, den_b))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num_a), size=(samples, len(num_a)))  # (S, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = num_b[idx].sum(1) / den_b[idx].sum(1) - num_a[idx].sum(1) / den_a[idx].sum(1)
    observed = num_b.sum() / den_b.sum() - num_a.sum() / den_a.sum()
    lo, hi = np.nanpercentile(diff, [2.5, 97.5])
    return float(observed), float(lo), float(hi)


@lru_cache(maxsize=32)
def _rejects(n: int, paired: bool, alpha: float) -> np.ndarray:
    """(n+1, n+1) bool: the outcomes (x, y) where the two-sided exact test rejects at level alpha. Paired: x, y = pairs
    solved only by A / only by B, exact McNemar (x given x + y = t is Binomial(t, 1/2)); unpaired: x, y = successes of
    A / B out of n each, Fisher's exact test (x given x + y = t is hypergeometric). p = P(outcomes no likelier)."""
    lf = np.cumsum(np.log(np.maximum(np.arange(2 * n + 1), 1)))  # log k!, k = 0..2n
    out = np.zeros((n + 1, n + 1), dtype=bool)
    for t in range(n + 1 if paired else 2 * n + 1):
        xs = np.arange(max(0, t - n), min(t, n) + 1)
        logp = (lf[t] - lf[xs] - lf[t - xs] - t * math.log(2)) if paired else \
            (2 * lf[n] - lf[xs] - lf[n - xs] - lf[t - xs] - lf[n - t + xs] - lf[2 * n] + lf[t] + lf[2 * n - t])
        p = np.exp(logp)
        ordered = np.sort(p)
        out[xs, t - xs] = np.cumsum(ordered)[np.searchsorted(ordered, p * (1 + 1e-7), side="right") - 1] <= alpha
    return out


def exact_power(n: int, p_a: float, p_b: float, paired: bool = True, alpha: float = 0.05) -> float:
    """Power of the two-sided exact test at level alpha, every outcome enumerated (_rejects). paired: McNemar on n
    pairs, each solved only by A with probability p_a, only by B with p_b (trinomial); unpaired: Fisher on two samples
    of n episodes with success rates p_a and p_b (two binomials)."""
    x, y = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")  # (n+1, n+1)
    lf = np.cumsum(np.log(np.maximum(np.arange(n + 1), 1)))
    xlogp = lambda k, q: np.where(k == 0, 0.0, k * math.log(q) if q > 0 else -np.inf)  # noqa: E731  0 log 0 = 0
    if paired:
        rest = np.maximum(n - x - y, 0)
        logp = lf[n] - lf[x] - lf[y] - lf[rest] + xlogp(x, p_a) + xlogp(y, p_b) + xlogp(rest, max(0.0, 1 - p_a - p_b))
    else:
        logp = sum(lf[n] - lf[k] - lf[n - k] + xlogp(k, q) + xlogp(n - k, 1 - q) for k, q in ((x, p_a), (y, p_b)))
    return float(np.exp(logp)[_rejects(n, paired, alpha)].sum())


def minimum_detectable_effect(n: int, background: float = 0.0, paired: bool = True, alpha: float = 0.05,
                              power: float = 0.8, tol: float = 1e-4) -> Optional[float]:  # detail #18
    """Smallest difference of success rates d = p_B - p_A that the two-sided exact test at level alpha detects with
    the given power on n episodes (exact_power, bisection to tol). paired: `background` = the rate of pairs solved
    only by A (discordance against the effect), only by B = background + d; unpaired: `background` = A's success rate.
    None when no difference reaches that power."""
    lo, hi = 0.0, 1 - (2 if paired else 1) * background
    if hi <= 0 or exact_power(n, background, background + hi, paired, alpha) < power:
        return None
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if exact_power(n, background, background + mid, paired, alpha) >= power else (mid, hi)
    return hi


# ---- Reporting ----
def rows_of(results: list[dict]) -> list[dict]:
    """Flatten {checkpoint, setting, metrics} into one row per rate with its Wilson interval."""
    rows = []
    for r in results:
        for metric, (k, n) in r["metrics"].items():
            lo, hi = wilson_interval(k, n)
            rows.append(dict(task=r["task"], setting=r["setting"], metric=metric, checkpoint=r["label"],
                             k=k, n=n, rate=k / n if n else float("nan"), wilson_lo=lo, wilson_hi=hi))
    return rows


def rate_cell(r: dict) -> str:
    return f"{100 * r['rate']:.1f} [{100 * r['wilson_lo']:.1f}, {100 * r['wilson_hi']:.1f}] ({r['k']}/{r['n']})" \
        if r["n"] else "n/a (0/0)"


def markdown_table(rows: list[dict], labels: list[str], reference_column: bool) -> str:
    """Success and the paper's metrics; the measures named "group: name" go to measures_table."""
    keys = list(dict.fromkeys((r["task"], r["setting"], r["metric"]) for r in rows
                              if not r["metric"].startswith("success@turn-") and ": " not in r["metric"]))
    cell = {(r["task"], r["setting"], r["metric"], r["checkpoint"]): r for r in rows}
    header = ["setting", "metric"] + labels + (["paper Init / RL / SFT"] if reference_column else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, setting, metric in keys:
        cells = [rate_cell(cell[(task, setting, metric, label)]) if (task, setting, metric, label) in cell else ""
                 for label in labels]
        if reference_column:
            ref = PAPER.get((task, setting, metric))
            cells.append(" / ".join(f"{x:.1f}" for x in ref) if ref else "")
        lines.append(f"| {task} {setting} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measures_table(rows: list[dict], results: list[dict], labels: list[str]) -> str:
    """Measures that move when success does not (issue 17): the MEANS as mean [bootstrap 95 %], the probes and the
    verifier's outcomes as rates (an outcome that no checkpoint gave is left out)."""
    cell = {(r["task"], r["setting"], name, r["label"]): f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]" if n else "n/a"
            for r in results for name, (m, lo, hi, n) in r.get("means", {}).items()}
    given = {(r["task"], r["setting"], r["metric"]) for r in rows if r["k"]}
    cell |= {(r["task"], r["setting"], r["metric"], r["checkpoint"]): rate_cell(r) for r in rows if ": " in r["metric"]
             and (not r["metric"].startswith("answers: ") or (r["task"], r["setting"], r["metric"]) in given)}
    order = list(dict.fromkeys((r["task"], r["setting"]) for r in results))
    lines = ["| setting | measure | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 2)]
    for key in sorted(dict.fromkeys(k[:3] for k in cell), key=lambda k: order.index(k[:2])):
        lines.append(f"| {key[0]} {key[1]} | {key[2]} | " + " | ".join(cell.get((*key, x), "") for x in labels) + " |")
    return ("Measures that move when success does not: mean reward per episode and per answer [bootstrap 95 %]; "
            "probes (envs.py) of each GP episode's first answer and of every verified V-IRL step; answers: the "
            "verifier's outcomes, % of all answers [Wilson 95 %]:\n\n" + "\n".join(lines)) if cell else ""


def turn_k_table(rows: list[dict]) -> str:
    """success@turn-k: solved within the first k verified answers; @K - @1 is what the verifier's feedback rescues."""
    turn_rows = [r for r in rows if r["metric"].startswith("success@turn-")]
    if not turn_rows:
        return ""
    max_k = max(int(r["metric"].split("-")[-1]) for r in turn_rows)
    header = ["setting", "checkpoint"] + [f"@{k}" for k in range(1, max_k + 1)] + ["rescued by feedback (@K - @1)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, setting, label in dict.fromkeys((r["task"], r["setting"], r["checkpoint"]) for r in turn_rows):
        by_k = {int(r["metric"].split("-")[-1]): r for r in turn_rows
                if (r["task"], r["setting"], r["checkpoint"]) == (task, setting, label)}
        cells = [f"{100 * by_k[k]['rate']:.1f}" if k in by_k else "" for k in range(1, max_k + 1)]
        last = by_k[max(by_k)]
        rescued = last["k"] - by_k[1]["k"]
        cells.append(f"{100 * rescued / last['n']:+.1f} ({rescued} episodes)")
        lines.append(f"| {task} {setting} | {label} | " + " | ".join(cells) + " |")
    return "success@turn-k (% of episodes solved within the first k verified answers):\n\n" + "\n".join(lines)


def paired_text(cmp: list[dict]) -> str:
    """One table row per comparison and measure; * = the 95 % interval excludes 0."""
    lines = ["| setting | B - A | measure | difference [paired bootstrap 95 %] | exact McNemar: only A / only B, p | "
             "minimum detectable effect (alpha 0.05, power 0.8) |", "|---|---|---|---|---|---|"]
    for x in cmp:
        f = (lambda v: f"{v:+.2f}") if x["metric"] in MEANS else (lambda v: f"{100 * v:+.1f}")  # noqa: E731
        sig = " *" if x["bootstrap_lo"] > 0 or x["bootstrap_hi"] < 0 else ""
        mc = f"{x['a_only']} / {x['b_only']}, p = {x['mcnemar_p']:.3g}" if "mcnemar_p" in x else ""
        pts = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
        mde = (f"exact: paired {pts(x['mde_paired'])}, unpaired {pts(x['mde_unpaired'])} points" if "mde_paired" in x
               else f"{x['mde_normal']:.2f} (normal approx.)" if "mde_normal" in x else "")
        lines.append(f"| {x['task']} {x['setting']} (n = {x['n']}) | {x['b']} - {x['a']} | {x['metric']}"
                     f"{'' if x['metric'] in MEANS else ' (points)'} | {f(x['difference'])} [{f(x['bootstrap_lo'])}, "
                     f"{f(x['bootstrap_hi'])}]{sig} | {mc} | {mde} |")
    return "\n".join(lines)


def curve_points(rows: list[dict], results: list[dict], checkpoints: list[dict]) -> list[dict]:
    """The points of the curves: per checkpoint of a --run-dir arm (the shared init at x = 0 of every arm), each
    rate of CURVES with its Wilson interval in %, and the mean reward per episode with its bootstrap interval."""
    info = {c["label"]: c for c in checkpoints}
    values = [dict(checkpoint=r["checkpoint"], task=r["task"], setting=r["setting"], metric=r["metric"],
                   value=100 * r["rate"], lo=100 * r["wilson_lo"], hi=100 * r["wilson_hi"])
              for r in rows if r["metric"] in CURVES]
    values += [dict(checkpoint=r["label"], task=r["task"], setting=r["setting"], metric=name, value=m, lo=lo, hi=hi)
               for r in results for name, (m, lo, hi, n) in r.get("means", {}).items() if name in CURVES and n]
    arms = list(dict.fromkeys(c["arm"] for c in checkpoints if c["arm"]))
    points = []
    for v in values:
        c = info[v["checkpoint"]]
        if c["arm"] is not None:
            points.append(dict(v, arm=c["arm"], step=c["step"], flops=c["flops"]))
        elif v["checkpoint"] == "init":  # the shared init starts every arm
            points += [dict(v, arm=arm, step=0.0, flops=0.0) for arm in arms]
    return points


def plot_curves(points: list[dict], path: str, task: str):
    """points (curve_points): one panel per (setting, measure), one line per arm, against training FLOPs since the
    init (or the training step when a checkpoint has no FLOPs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = [p for p in points if p["task"] == task]
    panels = list(dict.fromkeys((p["setting"], p["metric"]) for p in points))
    if not panels:
        return
    no_flops = list(dict.fromkeys(p["checkpoint"] for p in points if p["flops"] is None))
    if no_flops:  # detail #11
        print(f"{path}: x axis = training step, no FLOPs in the trainer_state.json of {', '.join(no_flops)}")
    xkey = "step" if no_flops else "flops"
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (setting, metric) in zip(axes.flat, panels):
        for arm in dict.fromkeys(p["arm"] for p in points):
            ps = sorted([p for p in points if p["arm"] == arm and (p["setting"], p["metric"]) == (setting, metric)
                         and p[xkey] is not None], key=lambda p: p[xkey])
            if ps:
                err = np.array([[p["value"] - p["lo"] for p in ps], [p["hi"] - p["value"] for p in ps]])  # (2, points)
                ax.errorbar([p[xkey] for p in ps], [p["value"] for p in ps], yerr=err, marker="o", capsize=3,
                            label=arm)
        ax.set_title(f"{task} {setting}: {metric}")
        ax.set_xlabel("training FLOPs since the init" if xkey == "flops" else "training step")
        if metric in MEANS:
            ax.set_ylabel("mean (bootstrap 95%)")
        else:
            ax.set_ylabel("%  (Wilson 95%)")
            ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(output_dir: str, rows: list[dict], results: list[dict], comparisons: list[dict], labels: list[str],
                 reference_column: bool, record: dict) -> str:
    """table.md (the tables below, printed too), results.csv (the rows) and results.json (record + rows, the
    per-setting results and the paired comparisons) -> the text of table.md."""
    sections = [markdown_table(rows, labels, reference_column), turn_k_table(rows),
                measures_table(rows, results, labels)]
    if comparisons:
        sections.append("Paired comparisons (same instances; * = the 95 % interval excludes 0):\n\n"
                        + paired_text(comparisons))
    text = "\n\n".join(x for x in sections if x)
    print("\n" + text + "\n")
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(output_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(dict(record, rows=rows, per_setting=[{k: v for k, v in r.items() if k != "metrics"} |
                                                       {"metrics": {m: list(kn) for m, kn in r["metrics"].items()}}
                                                       for r in results], paired=comparisons), f, indent=1)
    return text


# ---- episodes.jsonl: written line by line, read back by --replay and --resume ----
def read_episodes(path: str, tasks: tuple) -> list[tuple[int, dict]]:
    """(line number, episode) of an episodes.jsonl, checked line by line (one clear error line for a missing or
    malformed file; `tasks`: the task names a record may carry)."""
    if not os.path.isfile(path):
        fail(f"--replay {path!r}: " + ("a directory, not an episodes.jsonl" if os.path.isdir(path) else "no such file"))
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"--replay {path}: line {n} is not JSON ({e})")
                if not isinstance(rec, dict) or rec.get("task") not in tasks \
                        or not isinstance(rec.get("env_kwargs"), dict) or not isinstance(rec.get("seed"), int) \
                        or not isinstance(rec.get("turns"), list) \
                        or not all(isinstance(t, dict) and isinstance(t.get("response"), str)
                                   and isinstance(t.get("reward"), (int, float)) for t in rec["turns"]):
                    fail(f"--replay {path}: line {n} is not an eval.py episode record (task, setting, env_kwargs, "
                         "seed, turns with response and reward)")
                records.append((n, rec))
    except UnicodeDecodeError as e:
        fail(f"--replay {path}: not a UTF-8 text file ({e})")
    if not records:
        fail(f"--replay {path}: no episodes in the file")
    return records


def write_jsonl(f, record: dict):
    """One whole line per write, flushed and fsync'ed: a long run can be inspected (and replayed) while it is still
    going, and an interrupted one loses at most the line being written (--resume drops it)."""
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def resume_episodes(path: str) -> dict:
    """--resume: the episodes an interrupted run wrote, {(checkpoint label, task, setting, episode index): record}. A
    last line cut short (no newline) is cut off the file; any other unreadable line stops the run."""
    done = {}
    if not os.path.isfile(path):
        return done
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if lines[-1]:
        os.truncate(path, os.path.getsize(path) - len(lines[-1]))
        print(f"--resume: dropped the unfinished last line of {path}")
    for n, line in enumerate(lines[:-1], 1):
        try:
            rec = json.loads(line)
            done[(rec["checkpoint"], rec["task"], rec["setting"], rec["episode"])] = rec
        except (ValueError, KeyError, TypeError):
            fail(f"--resume: line {n} of {path} is not an eval.py episode record; choose a new --output-dir")
    return done
