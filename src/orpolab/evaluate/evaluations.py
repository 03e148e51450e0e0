"""Several evaluations of one sweep side by side: each named by its settings, each listing the others.

An evaluation's id is a short hash of its settings (the ``evaluation`` and ``eval_prompts`` groups,
interpolations unresolved, so ``${paths.cache_dir}/judge.gguf`` names the same judge on any machine);
its answers, verdicts and scores go to ``<sweep>/evaluation/<id>/`` with the settings beside them
(``settings.yaml``), and its report to ``<report root>/<sweep id>/<id>/``. Settings that do not change
a result (whether the stage is enabled, where the calibration cache and the stores live, whether
stored work is reused, generation threads) are
left out of the id. Every report lists the sweep's evaluations (judge, prompt set, headline figures)
between two markers; writing one report rewrites that list in the reports of the others, so a
stand-in run and a real-judge run name each other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from orpolab.core.stage_config import plain

# Settings that leave every answer, verdict and score as it is.
NOT_IDENTITY = (("evaluation", "enabled"), ("evaluation", "judge", "calibration_cache"),
                ("evaluation", "generation", "threads"), ("evaluation", "reuse"), ("evaluation", "store_dir"))
BEGIN, END = "<!-- evaluations of this sweep -->", "<!-- /evaluations of this sweep -->"


def settings_of(cfg: DictConfig) -> dict:
    """The evaluation's settings as written beside its results (interpolations unresolved)."""
    return {"evaluation": plain(cfg.evaluation), "eval_prompts": plain(cfg.eval_prompts)}


def evaluation_id(cfg: DictConfig) -> str:
    """8 hex digits of the settings that shape the results (see module doc)."""
    body = settings_of(cfg)
    for *parents, leaf in NOT_IDENTITY:
        node = body
        for key in parents:
            node = node.get(key) or {}
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:8]


def write_settings(folder: Path, cfg: DictConfig, eid: str) -> None:
    """``settings.yaml`` beside the results: what this evaluation is, readable and re-usable as overrides."""
    folder.mkdir(parents=True, exist_ok=True)
    text = f"# evaluation {eid}: the settings its results in this folder were made with\n" + OmegaConf.to_yaml(
        OmegaConf.create(settings_of(cfg)))
    tmp = folder / ".settings.yaml.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / "settings.yaml")


def summary(folder: Path) -> dict | None:
    """One evaluation's line in the list: judge, prompt set and headline figures, from its ``results.json``."""
    results_file = folder / "results.json"
    if not (folder / "settings.yaml").is_file():
        return None
    entry = {"id": folder.name, "judge": "-", "prompts": "-", "headline": "not scored yet",
             "time": (results_file if results_file.is_file() else folder / "settings.yaml").stat().st_mtime}
    if not results_file.is_file():
        return entry
    r = json.loads(results_file.read_text())
    ev = (r.get("splits") or {}).get("evaluation_prompts") or {}
    entry["judge"] = r.get("judge", "-")
    entry["prompts"] = f"{ev.get('n', r.get('prompts'))} from {ev.get('source', '?')} ({ev.get('kind', '?')})"
    model = (r.get("trained") or ["winner"])[0]
    parts = []
    for fig in r.get("checks") or []:
        mine, base = (r["models"].get(m, {}).get("checks", {}).get(fig) for m in (model, "base"))
        if mine and base:
            parts.append(f"{fig.replace('_', ' ')} {mine['mean']:.3f} (base {base['mean']:.3f})")
    for name, metric in (r.get("metrics") or {}).items():
        if metric.get(model) and metric.get("base"):
            parts.append(f"judge {name.removeprefix('RESPONSE_').lower()} {metric[model]['mean']:.3f} "
                         f"(base {metric['base']['mean']:.3f})")
    entry["headline"] = f"{model}: " + "; ".join(parts) if parts else "no figures"
    return entry


def evaluations(sweep: Path) -> list[dict]:
    """Every evaluation of a sweep, oldest first."""
    root = Path(sweep) / "evaluation"
    found = [summary(f) for f in sorted(root.iterdir()) if f.is_dir()] if root.is_dir() else []
    return sorted((e for e in found if e), key=lambda e: e["time"])


def section(entries: list[dict], current: str, report_sweep_dir: Path) -> list[str]:
    """The Markdown list of a sweep's evaluations, between the markers, ``current`` marked as this report."""
    md = [BEGIN, "## Evaluations of this sweep", "",
          "Each evaluation has its own settings (`<sweep>/evaluation/<id>/settings.yaml`) and report.", "",
          "| evaluation | judge | prompts | headline | report |", "|---|---|---|---|---|"]
    for e in entries:
        if e["id"] == current:
            link = "this report"
        elif (report_sweep_dir / e["id"] / "report.md").is_file():
            link = f"[{e['id']}](../{e['id']}/report.md)"
        else:
            link = "not in this report folder"
        md.append(f"| `{e['id']}` | {e['judge']} | {e['prompts']} | {e['headline']} | {link} |")
    return [*md, "", END]


def refresh_others(entries: list[dict], current: str, report_sweep_dir: Path) -> None:
    """Rewrite the list in the other evaluations' reports of this sweep (written before this one existed)."""
    for e in entries:
        report = report_sweep_dir / e["id"] / "report.md"
        if e["id"] == current or not report.is_file():
            continue
        text = report.read_text(encoding="utf-8")
        start, end = text.find(BEGIN), text.find(END)
        if start < 0 or end < 0:
            continue
        new = text[:start] + "\n".join(section(entries, e["id"], report_sweep_dir)) + text[end + len(END):]
        tmp = report.with_name(".report.md.tmp")
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, report)
