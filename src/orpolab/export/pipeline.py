"""Turn a finished sweep into a CPU model: winner -> merged model -> GGUF (f16 + quants) -> verified.

Runs after every multirun (``SweepCallback.on_multirun_end`` starts it as a subprocess, so the
memory held by the training jobs is freed), or by hand on an existing sweep:

    python -m orpolab.export multirun/demo/2026-11-22_10-00-00
    python -m orpolab.export --run-id <MLflow parent run id> --quant Q4_K_M Q8_0
    python -m orpolab.export multirun/demo/<sweep id> export.quant_types=[Q8_0] export.include_base=false

Everything lands in ``<sweep>/export/`` and on the sweep's MLflow parent run. ``export.json`` names its
files relative to the sweep folder, so the folder can be copied elsewhere and evaluated there. An
export that is already there, for the same winners and settings, is not made again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from orpolab.core import console, llama_runtime, records, sweep_layout, tracking
from orpolab.core.config import DataConfig, ExportConfig, LoraSettings, ModelConfig, settings
from orpolab.core.errors import OrpolabError
from orpolab.core.files import inside, relative_to, write_json_atomic
from orpolab.core.records import SweepRecord
from orpolab.core.stage_config import compose_stage
from orpolab.core.validate import export_quant_types
from orpolab.export import llamacpp
from orpolab.export.merge import check_disk, merge, parameter_count, with_chat_template
from orpolab.export.verify import verify_gguf
from orpolab.export.winners import select_winners, sweep_parent
from orpolab.train.data import SkipRow, normalize_row, three_splits

log = logging.getLogger(__name__)


def held_out_texts(job_cfg: DictConfig, tokenizer, n: int) -> tuple[list[str], list[str]]:
    """Chat-formatted validation conversations (prompt + chosen answer) and their prompts, for verification.

    Never training rows: a GGUF is checked on text the model was not fitted to (the validation split,
    which the job saw only to pick its checkpoint; the test split when validation has too few).
    """
    data_cfg = settings(DataConfig, job_cfg.data, "data")
    splits = three_splits(data_cfg, need_train=False)
    texts, prompts = [], []
    for row in [*splits.validation, *splits.test]:
        try:
            prompt, chosen, _ = normalize_row(row, data_cfg)
        except SkipRow:
            continue
        texts.append(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": chosen}], tokenize=False))
        prompts.append(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
        if len(texts) >= n:
            break
    if not texts:
        raise OrpolabError("no held-out text to verify the export on")
    return texts, prompts


def base_model_dir(model_cfg: ModelConfig) -> Path:
    """A local folder of the base model for the converter (a hub snapshot for hub ids)."""
    local = Path(model_cfg.name_or_path).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    def snapshot(local_only: bool) -> Path:
        return Path(snapshot_download(model_cfg.name_or_path, revision=model_cfg.revision, local_files_only=local_only,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja",
                                                      "*.txt"]))

    try:
        return snapshot(local_only=True)
    except Exception:  # not (completely) in the hub cache: say so before a download of several GB
        print(f"downloading the base model {model_cfg.name_or_path} from the Hugging Face hub (its weights, for "
              "the base GGUF) ...", flush=True)
    try:
        return snapshot(local_only=False)
    except Exception as err:
        raise OrpolabError(f"could not download the base model {model_cfg.name_or_path} for its GGUF: {err}. "
                           "Download it once with network, or pass --no-base.") from err


def gguf_set(src: Path, stem: str, out_dir: Path, quants: list[str], cache_dir: str, name: str) -> dict[str, Path]:
    """f16 GGUF via llama.cpp's converter, then each quantization of it (one console line for all)."""
    print(f"  {stem}: GGUF f16{''.join(', ' + q.upper() for q in quants)} ...", flush=True)
    files = {"F16": llamacpp.convert(src, out_dir / f"{stem}-f16.gguf", cache_dir, "f16", name=name)}
    for q in quants:
        files[q.upper()] = llamacpp.quantize(files["F16"], out_dir / f"{stem}-{q.upper()}.gguf", q)
    return files


def export_winner(label: str, w, job_cfg, model_cfg: ModelConfig, export_cfg: ExportConfig, sweep: Path,
                  cache_dir: str, held_out: tuple[list[str], list[str]] | None
                  ) -> tuple[dict, list[dict], tuple[list[str], list[str]]]:
    """One exported model: the adapter merged, its GGUFs, each verified against the merged model.

    Returns its entry of ``export.json`` (paths relative to the sweep folder, which can move), its
    verification rows, and the held-out texts they were verified on (read once, shared by all winners).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = sweep / "export"
    suffix = "" if label == "winner" else f"-{label}"
    model_name = Path(model_cfg.name_or_path).name
    lora_cfg = settings(LoraSettings, job_cfg.lora, "lora")
    fallback = settings(DataConfig, job_cfg.data, "data").fallback_chat_template
    print(f"  {label}: merging the adapter into {model_name} ...", flush=True)
    merged_dir = merge(model_cfg, lora_cfg, w.best_checkpoint, out / f"merged{suffix}",
                       adapter_dir=out / f"adapter{suffix}", headroom=export_cfg.memory_headroom,
                       fallback_chat_template=fallback)
    title = "winner" if label == "winner" else f"{label} winner"
    files = gguf_set(merged_dir, label, out / "gguf", export_cfg.quant_types, cache_dir,
                     f"{model_name} orpolab {title} (job {w.job_num})")
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    texts, prompt_texts = held_out or held_out_texts(job_cfg, tokenizer, export_cfg.verify.num_texts)
    hf_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype="float32").eval()
    checks = [{"model": label, **verify_gguf(hf_model, tokenizer, path, texts, q, export_cfg.verify,
                                             prompt_texts=prompt_texts)} for q, path in files.items()]
    del hf_model
    entry = {
        "run_id": w.run_id, "job": w.job_num, "overrides": w.overrides, "method": w.method,
        "metric": w.metric, "mode": w.mode, "value": w.value,
        "best_checkpoint": relative_to(w.best_checkpoint, sweep), "job_dir": relative_to(w.output_dir, sweep),
        "model": model_cfg.name_or_path, "merged_model": relative_to(merged_dir, sweep),
        "adapter": relative_to(out / f"adapter{suffix}", sweep),
        "gguf": {k: relative_to(v, sweep) for k, v in files.items()},
    }
    return entry, checks, (texts, prompt_texts)


def set_aside_failed(checks: list[dict], sweep: Path) -> None:
    """Rename every GGUF that failed verification (a GGUF that is not the trained model must not look like
    one), and record the checks' paths relative to the sweep folder."""
    for check in checks:
        if not check["passed"]:
            bad = Path(check["gguf"])
            os.replace(bad, bad.with_suffix(".failed-verification.gguf"))
        check["gguf"] = relative_to(check["gguf"], sweep)


def export_sweep(tracking_uri: str, experiment: str, sweep_dir: str | None = None, parent_run_id: str | None = None,
                 export_cfg: ExportConfig | None = None) -> dict:
    """The whole export; returns the summary also written to ``<sweep>/export/export.json``.

    A one-method sweep exports its winner (files named ``winner-*``); a mixed-method sweep exports
    the best job of each method (``orpo-*``, ``dpo-*``, ...), all from the same base model.
    """
    parent = sweep_parent(tracking_uri, experiment, sweep_dir, parent_run_id)
    sweep = sweep_folder(parent)
    export_cfg = export_cfg or stage_settings(sweep, [])
    winners = select_winners(tracking_uri, parent)
    done = up_to_date(sweep, winners, export_cfg)
    if done is not None:
        print(f"  export: up to date for these winners and settings ({sweep / 'export' / 'export.json'})", flush=True)
        return done
    from transformers import AutoConfig  # only when there is work

    job_cfgs = {label: OmegaConf.load(Path(w.output_dir) / ".hydra" / "config.yaml") for label, w in winners.items()}
    first = next(iter(winners))
    job_cfg = job_cfgs[first]
    model_cfg = settings(ModelConfig, job_cfg.model, "model")
    models = {label: str(c.model.name_or_path) for label, c in job_cfgs.items()}
    if len(set(models.values())) > 1:
        raise OrpolabError(
            "a mixed-method sweep is compared against one base model, but the methods' best jobs used "
            f"different models ({models}); sweep the methods on one model at a time"
        )
    out = sweep / "export"
    cache_dir = str(Path(job_cfg.paths.cache_dir))
    llamacpp.converter_dir(cache_dir, fetch=False)  # before any work: the converter is set up, or say how
    for label, w in winners.items():
        print(f"  {label}: job {w.job_num} ({console.brief_overrides(w.overrides)}), {w.metric} {w.value:.4f}",
              flush=True)

    # Disk: a merged model + an f16 GGUF + quants per exported model (and the base), from the parameter count.
    n_params = parameter_count(AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision))
    copies = len(winners) + (1 if export_cfg.include_base else 0)
    need = n_params * (4 * len(winners) + copies * (2 + len(export_cfg.quant_types)))
    check_disk(out, need, "the export")

    model_name = Path(model_cfg.name_or_path).name
    exported: dict[str, dict] = {}
    checks: list[dict] = []
    held_out: tuple[list[str], list[str]] | None = None
    for label, w in winners.items():
        exported[label], verified, held_out = export_winner(label, w, job_cfgs[label], model_cfg, export_cfg, sweep,
                                                           cache_dir, held_out)
        checks += verified
    base_files = {}
    if export_cfg.include_base:
        # A base without a chat template of its own gets the one its trained model was given (the fallback).
        fallback = settings(DataConfig, job_cfg.data, "data").fallback_chat_template
        base_dir = with_chat_template(model_cfg, base_model_dir(model_cfg), fallback, out / "base-with-template")
        base_files = gguf_set(base_dir, "base", out / "gguf", export_cfg.quant_types, cache_dir, f"{model_name} base")
    passed = all(c["passed"] for c in checks)
    set_aside_failed(checks, sweep)
    summary = {
        "parent_run_id": parent.run_id, "passed": passed,
        "winners": exported,
        # The first exported model; its job folder holds the config the evaluation starts from
        # (.hydra/), and "config" keeps a resolved copy as a record of what ran where it was trained.
        "winner": {**exported[first], "label": first, "config": OmegaConf.to_container(job_cfg, resolve=True)},
        "merged_model": exported[first]["merged_model"], "adapter": exported[first]["adapter"],
        "gguf": {**{label: e["gguf"] for label, e in exported.items()},
                 "base": {k: relative_to(v, sweep) for k, v in base_files.items()}},
        "verification": checks,
        "settings": plain_settings(export_cfg),
    }
    write_json_atomic(out / "export.json", summary)
    _log_to_mlflow(tracking_uri, parent, summary, export_cfg)
    print(format_verification(checks), flush=True)
    if not passed:
        raise OrpolabError(f"the exported GGUF does not match the trained model; see {out / 'export.json'}")
    print(f"  export: {out}", flush=True)
    return summary


def format_verification(checks: list[dict]) -> str:
    lines = ["  verification (GGUF vs merged PyTorch model on held-out text):"]
    for c in checks:
        lines.append(
            f"    {Path(c['gguf']).name:<22} token ids {'identical' if not c['token_id_mismatches'] else 'DIFFER'}"
            f"  ppl {c['ppl_gguf']:.3f} vs {c['ppl_pytorch']:.3f} (x{c['ppl_ratio']:.3f}, max {c['max_ppl_ratio']})"
            f"  top-1 {c['top1_agreement']:.3f} (min {c['min_top1_agreement']})  {'ok' if c['passed'] else 'FAILED'}"
        )
    return "\n".join(lines)


def sweep_folder(parent: SweepRecord) -> Path:
    """The sweep's folder, as its MLflow run records it; refused when an older layout of orpolab wrote it."""
    sweep = Path(parent.sweep_dir)
    sweep_layout.check_sweep(sweep, retry="train it again as a new sweep")
    return sweep


def stage_settings(sweep: Path, overrides: list[str]) -> ExportConfig:
    """The export settings: the sweep's recorded ones, composed with this command's ``export.*`` overrides."""
    cfg = compose_stage(sweep, None, overrides, ("export",), "python -m orpolab.export")
    return settings(ExportConfig, cfg.export, "export")


def plain_settings(cfg: ExportConfig) -> dict:
    """The settings as JSON values, to tell whether an existing export was made with the same ones."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def up_to_date(sweep: Path, winners: dict, cfg: ExportConfig) -> dict | None:
    """The existing export's summary when it passed, for the same winners and settings, with all its GGUFs."""
    file = sweep / "export" / "export.json"
    if not file.is_file():
        return None
    summary = json.loads(file.read_text())
    same = (summary.get("passed") and summary.get("settings") == plain_settings(cfg)
            and {k: e["run_id"] for k, e in summary.get("winners", {}).items()} == {k: w.run_id for k, w in
                                                                                     winners.items()})
    files = [inside(sweep, p) for group in summary.get("gguf", {}).values() for p in group.values()]
    return summary if same and all(f.is_file() for f in files) else None



def _log_to_mlflow(tracking_uri: str, parent: SweepRecord, summary: dict, cfg: ExportConfig) -> None:
    run = tracking.SweepRun(tracking_uri, parent.run_id)
    run.log_dict(summary, "export/export.json")
    sweep = Path(parent.sweep_dir)
    merged = inside(sweep, summary["merged_model"])
    run.set_tags({records.EXPORT_DIR: str(merged.parent), records.MERGED_MODEL: str(merged),
                  records.EXPORT_PASSED: str(summary["passed"])})
    for check in summary["verification"]:
        q = check["quant"] if check.get("model", "winner") == "winner" else f"{check['model']}/{check['quant']}"
        run.log_metrics({f"export/{q}/ppl_ratio": check["ppl_ratio"],
                         f"export/{q}/top1_agreement": check["top1_agreement"],
                         f"export/{q}/token_id_mismatches": check["token_id_mismatches"]})
    for group in summary["gguf"].values():
        for path in group.values():
            p = inside(sweep, path)
            if p.is_file() and p.stat().st_size <= cfg.log_gguf_max_mb * 2**20:
                run.log_artifact(p, "export/gguf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a finished sweep's winner to GGUF (merge, convert, "
                                                 "quantize, verify).")
    parser.add_argument("sweep_dir", nargs="?", help="the sweep folder (multirun/...)")
    parser.add_argument("overrides", nargs="*", metavar="export.KEY=VALUE",
                        help="Hydra-style overrides of the export settings, e.g. export.quant_types=[Q8_0]")
    parser.add_argument("--run-id", help="the sweep's MLflow parent run id instead of its folder")
    parser.add_argument("--quant", nargs="+", help="quantization types (default: the sweep's export.quant_types)")
    parser.add_argument("--no-base", action="store_true", help="do not convert the base model")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the project's mlflow.db)")
    parser.add_argument("--experiment", default="orpolab")
    console.add_debug_flag(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    console.quiet_libraries()
    console.log_to(None)
    uri = args.tracking_uri or tracking.default_uri()

    if args.sweep_dir and "=" in args.sweep_dir and not Path(args.sweep_dir).is_dir():  # --run-id with overrides
        args.overrides, args.sweep_dir = [args.sweep_dir, *args.overrides], None

    def export() -> None:
        from orpolab.core.stage_config import refuse_other_groups

        refuse_other_groups(args.overrides, ("export",), "python -m orpolab.export")
        quants = export_quant_types(args.quant) if args.quant else None  # checked before anything is looked up
        parent = sweep_parent(uri, args.experiment, args.sweep_dir, args.run_id)
        sweep = sweep_folder(parent)
        cfg = stage_settings(sweep, args.overrides)
        if quants:
            cfg = dataclasses.replace(cfg, quant_types=quants)
        if args.no_base:
            cfg = dataclasses.replace(cfg, include_base=False)
        logs = sweep / "logs"
        console.log_to(logs / "export.log")  # libraries' logs; the console keeps orpolab's lines
        llama_runtime.route_logs(logs / "llama.cpp.log")
        export_sweep(uri, args.experiment, args.sweep_dir, args.run_id, cfg)

    return console.run_cli(export, args.debug)
