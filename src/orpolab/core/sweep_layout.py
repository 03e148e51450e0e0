"""Which orpolab layout wrote a sweep folder; a folder from another layout is refused with one sentence.

A sweep folder outlives the code that wrote it: Hydra's configs name orpolab's classes, submitit's
pickles name its functions, ``export/export.json`` names paths. orpolab does not keep old module paths
importable for them, so a sweep started by an older layout is refused before anything of it is
resumed, exported or evaluated, with the version that wrote it and what to do. The layouts:

1. before the stage packages (commit 5122ee5): modules such as ``orpolab.callbacks`` or
   ``orpolab.train.main``, named in its ``multirun.yaml``, its jobs' ``.hydra/`` files and its pickles;
2. before paths in a sweep folder were relative to it (commit 86983ec): an ``export.json`` whose
   winner has no ``job_dir``;
3. this one, stamped in ``<sweep>/.orpolab-layout.json`` when a sweep starts.

Everything is read as data: YAML as text, pickles by their opcodes (``pickletools``), never unpickled.
"""

from __future__ import annotations

import json
import pickletools
import re
from itertools import pairwise
from pathlib import Path

from orpolab.core.errors import OrpolabError
from orpolab.core.files import write_json_atomic

LAYOUT = 3
STAMP = ".orpolab-layout.json"
# Module paths of layout 1 (each one now lives in a stage package).
FLAT_MODULES = ("errors", "files", "machine", "tracking", "data", "model", "losses", "module", "checkpoints",
                "callbacks", "sweep_id", "select", "merge", "llamacpp", "verify", "generate", "judge", "stats",
                "report", "chat", "tiny", "warmup", "sample_task")
FLAT_PATH = re.compile(r"\borpolab\.(" + "|".join(FLAT_MODULES) + r")\b(?!\.py)")
# Layout 1's task function: orpolab.train was a module then, orpolab.train.job holds it now.
FLAT_TASK = ("orpolab.train", ("main", "run"))
STAGE_PACKAGES_COMMIT, RELATIVE_PATHS_COMMIT = "5122ee5", "86983ec"


def stamp(sweep_dir: str | Path, commit: str) -> None:
    """Record this layout in a sweep folder that has no stamp yet (the first command that starts it),
    with the version and commit that wrote it, for the sentence that may one day refuse it."""
    from importlib import metadata

    path = Path(sweep_dir) / STAMP
    if path.is_file():
        return
    try:
        version = metadata.version("orpolab")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        version = "unknown"
    write_json_atomic(path, {"layout": LAYOUT, "orpolab": version, "commit": commit})


def check_sweep(sweep_dir: str | Path, retry: str) -> None:
    """Raise the sentence that refuses a sweep folder of another layout; ``retry``: what starts a new sweep."""
    folder = Path(sweep_dir)
    stamped = stamp_of(folder)
    if stamped is not None and stamped.get("layout") != LAYOUT:
        newer = int(stamped.get("layout", 0)) > LAYOUT
        raise OrpolabError(
            f"sweep folder {folder} was written by orpolab {stamped.get('orpolab', '?')} (commit "
            f"{stamped.get('commit', '?')}, layout {stamped.get('layout')}), " + (
                "a newer version than this one: update this checkout to continue it" if newer else
                f"whose files this version does not read: finish it with that commit, or {retry}"))
    found = flat_module_path(folder) if stamped is None else None
    if found is not None:
        file, name = found
        raise OrpolabError(
            f"sweep folder {folder} was written by orpolab before its stage packages (before commit "
            f"{STAGE_PACKAGES_COMMIT}): {file.relative_to(folder)} names {name}, which no longer exists; finish it "
            f"with that version (git checkout {STAGE_PACKAGES_COMMIT}~1), or {retry}")


def check_export(sweep_dir: str | Path, export: dict) -> None:
    """Raise the sentence that refuses an ``export.json`` of layout 2 (its winner's job folder unrecorded)."""
    if "job_dir" not in export.get("winner", {}):
        raise OrpolabError(
            f"the export of {sweep_dir} was written by orpolab before exports recorded the winner's job folder "
            f"(before commit {RELATIVE_PATHS_COMMIT}); export it again: python -m orpolab.export {sweep_dir}")


def stamp_of(folder: Path) -> dict | None:
    path = folder / STAMP
    if not path.is_file():
        return None
    try:
        stamped = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise OrpolabError(f"{path} is not readable JSON ({err}); it records which orpolab wrote the sweep") from err
    if not isinstance(stamped, dict):
        raise OrpolabError(f"{path} is not a JSON object; it records which orpolab wrote the sweep")
    return stamped


def flat_module_path(folder: Path) -> tuple[Path, str] | None:
    """The first file of the sweep naming a module path of layout 1, and that path; None when none does."""
    yamls = [folder / "multirun.yaml", *sorted(folder.glob("*/.hydra/*.yaml"))]
    for path in yamls:
        if path.is_file():
            match = FLAT_PATH.search(path.read_text(encoding="utf-8", errors="replace"))
            if match:
                return path, match.group(0)
    for path in sorted((folder / ".submitit").rglob("*.pkl")) if (folder / ".submitit").is_dir() else []:
        name = flat_global(path.read_bytes())
        if name is not None:
            return path, name
    return None


def flat_global(data: bytes) -> str | None:
    """A layout-1 ``module.name`` a pickle refers to, from its opcodes (nothing is unpickled)."""
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):  # "module name", protocols 0-3
                strings += arg.split(" ", 1)
            elif isinstance(arg, str):  # pushed strings: STACK_GLOBAL takes module and name from them
                strings.append(arg)
    except Exception:  # a truncated or foreign file: judged by what was read of it
        pass
    for module, name in pairwise(strings):
        if FLAT_PATH.fullmatch(module) or (module == FLAT_TASK[0] and name in FLAT_TASK[1]):
            return f"{module}.{name}"
    return None
