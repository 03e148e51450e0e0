"""The report's section on a hyperparameter search: how the search went, what it found, how to rerun it.

Drawn from what the search left in its sweep folder (``search.json``, written by the sweeper when the
search ends) and from its Optuna study, with Optuna's own matplotlib visualisation: the optimisation
history, the parameters' importances, and the selection metric against beta and the learning rate
(slice plots, and a contour of the two together). ``python -m orpolab.evaluate.search_report <sweep>``
writes it alone (``search.md``), e.g. for a search whose evaluation is turned off.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from orpolab.core import console
from orpolab.core.errors import OrpolabError

log = logging.getLogger(__name__)
SUMMARY_FILE = "search.json"


def load(sweep_dir: Path) -> dict | None:
    """The search's summary, or None for a grid sweep (no ``search.json``)."""
    path = Path(sweep_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    summary.setdefault("storage", f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}")
    return summary


def key_params(names: list[str]) -> list[str]:
    """The parameters the plots of the metric single out: beta and the learning rate, when searched."""
    wanted = [n for n in names if n.endswith("beta")] + [n for n in names if n.endswith(".lr")]
    return wanted or names[:2]


def plots(summary: dict, out_dir: Path) -> dict[str, str]:
    """PNG files name -> caption, drawn with ``optuna.visualization.matplotlib``; a plot Optuna cannot draw
    (too few complete trials, one parameter) is left out and logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as vis

    optuna.logging.disable_default_handler()
    study = optuna.load_study(study_name=summary["study"], storage=summary["storage"])
    names = sorted({k for t in summary["trials"] for k in t["params"]})
    focus = key_params(names)
    wanted = {
        "search_history.png": ("optimisation history", lambda: vis.plot_optimization_history(study)),
        "search_importances.png": ("parameter importances", lambda: vis.plot_param_importances(study)),
        "search_slice.png": (f"{summary['metric']} against {', '.join(focus)}",
                             lambda: vis.plot_slice(study, params=focus)),
    }
    if len(focus) >= 2:
        wanted["search_contour.png"] = (f"{summary['metric']} over {focus[0]} and {focus[1]}",
                                        lambda: vis.plot_contour(study, params=focus[:2]))
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for name, (caption, draw) in wanted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(9, 5)
            figure.savefig(out_dir / name, dpi=100, bbox_inches="tight")
            plt.close(figure)
            drawn[name] = caption
        except Exception as err:  # noqa: BLE001 - a plot that cannot be drawn must not stop the report
            log.info("search plot %s not drawn: %s: %s", name, type(err).__name__, err)
    return drawn


def _value(v: float | None) -> str:
    return f"{v:.4f}" if v is not None else "-"


def section(sweep_dir: Path, out_dir: Path) -> list[str]:
    """The Markdown lines of the search section (empty for a grid sweep), its plots written to ``out_dir``."""
    summary = load(sweep_dir)
    if summary is None:
        return []
    trials = summary["trials"]
    searched = [t for t in trials if t.get("confirm_of") is None]
    counts = {s: sum(t["state"] == s for t in searched) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    md = ["## Search", "",
          f"Optuna study `{summary['study']}` ({summary['storage']}): {len(searched)} trials, to "
          f"{summary['direction']} `{summary['metric']}` on the validation split: {counts['COMPLETE']} complete, "
          f"{counts['PRUNED']} pruned (stopped early: never the winner), {counts['FAIL']} failed"
          + (f", {counts['RUNNING']} interrupted (the same command resumes them)" if counts["RUNNING"] else "") + ".",
          ""]
    best = summary.get("best")
    if best:
        values = ", ".join(f"`{k}` = {v:.4g}" if isinstance(v, float) else f"`{k}` = {v}"
                           for k, v in best["params"].items())
        md += [f"**Best trial {best['number']}**: {summary['metric']} {best['value']:.4f} with {values}. "
               "Reproduce it with:", "", "```", best["command"], "```", ""]
        spread = best.get("spread")
        if spread:
            again = ", ".join(_value(v) for v in best["confirm_values"])
            md += [f"Its values again with {spread['n'] - 1} other seed(s) ({again}): "
                   f"mean {spread['mean']:.4f}, standard deviation {spread['sd']:.4f}, "
                   f"range {spread['min']:.4f} to {spread['max']:.4f}. A search's best trial is partly luck: "
                   "differences between trials smaller than this spread are noise.", ""]
    for name, caption in plots(summary, out_dir).items():
        md += [f"![{caption}]({name})", ""]
    names = sorted({k for t in trials for k in t["params"]})
    md += ["| trial | state | " + " | ".join(names) + f" | {summary['metric']} | last step reported | note |",
           "|---|---|" + "---|" * len(names) + "---|---|---|"]
    for t in trials:
        cells = [f"{t['params'][n]:.4g}" if isinstance(t["params"].get(n), float) else str(t["params"].get(n, ""))
                 for n in names]
        note = (f"seed {t['seed']}, re-run of trial {t['confirm_of']}" if t.get("confirm_of") is not None
                else (t.get("error") or "")[:80])
        mark = f"**{t['number']}**" if best and t["number"] == best["number"] else str(t["number"])
        md.append(f"| {mark} | {t['state'].lower()} | " + " | ".join(cells)
                  + f" | {_value(t['value'])} | {t['last_step'] if t['last_step'] is not None else '-'} | {note} |")
    return md + [""]


def write(sweep_dir: Path, out_dir: Path) -> Path:
    """``search.md`` alone, with its plots, in ``out_dir``."""
    lines = section(sweep_dir, out_dir)
    if not lines:
        raise OrpolabError(f"{sweep_dir} holds no search ({SUMMARY_FILE} is missing): it is a grid sweep, or its "
                           "search has not ended yet")
    out = out_dir / "search.md"
    tmp = out_dir / ".search.md.tmp"
    tmp.write_text(f"# Search: {Path(sweep_dir).name}\n\n" + "\n".join(lines), encoding="utf-8")
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orpolab.evaluate.search_report", description=__doc__)
    parser.add_argument("sweep", type=Path, help="the search's sweep folder")
    parser.add_argument("--out", type=Path, help="where to write search.md (default: report/<sweep id>)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        out = write(args.sweep, args.out or Path("report") / args.sweep.resolve().name)
    except OrpolabError as err:
        if args.debug:
            raise
        print(console.error_line(err), file=sys.stderr, flush=True)
        return 1
    print(f"Search report: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
