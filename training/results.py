"""The results tree: every evaluation run writes its own folder, and pages are built from the newest row per cell.

    results/<job>/<dataset>/<run>/config.json   the run: command, commit, date, machine, its settings
    results/<job>/<dataset>/<run>/rows.jsonl    one measured cell per line: the cell's key fields and its figures

A run never edits another's folder. Reading a job back (`newest`) takes, for each cell key, the row of the newest run
that measured it, and says which run that was (`row["run"]`), so no script merges results across runs by hand.
`python -m training.report` builds docs/*.md, the README's tables and `models/measured.json` (the figures
`/v1/models` shows) from this tree alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
Where = Callable[[dict], bool]


def dumps(obj: object) -> str:
    """One row as JSON on one line: keys in the order measured (the pages keep it), non-ASCII kept readable."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def start_run(job: str, dataset: str, config: dict, root: Path = RESULTS_DIR) -> Path:
    """Create results/<job>/<dataset>/<run>/ with its config.json and return the folder. The run's name is its UTC
    start time (then -2, -3 … should two runs start in the same second)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = Path(root) / job / dataset
    base.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):  # mkdir claims the name: a second process starting in the same second takes the next
        run = base / (stamp if i == 1 else f"{stamp}-{i}")
        try:
            run.mkdir()
            break
        except FileExistsError:
            continue
    config = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **config}
    (run / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return run


def write_rows(run: Path, rows: Iterable[dict]) -> None:
    """Append rows (one measured cell each) to the run's rows.jsonl."""
    with open(run / "rows.jsonl", "a") as f:
        for row in rows:
            f.write(dumps(row) + "\n")


def runs(job: str, dataset: str, root: Path = RESULTS_DIR, where: Where | None = None) -> list[Path]:
    """The runs of a job on a dataset, oldest first (run folders are named by their start time); `where`: only
    those whose config it accepts."""
    base = Path(root) / job / dataset
    found = sorted((p for p in base.iterdir() if (p / "config.json").exists()), key=_order) if base.exists() else []
    return [p for p in found if where is None or where(config(p))]


def order(name: str) -> tuple[str, int]:
    """A run folder's name as a sort key: its start time, then its number within that second."""
    stamp, _, i = name.partition("-")
    return stamp, int(i or 1)


def _order(run: Path) -> tuple[str, int]:
    return order(run.name)


def config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def rows(run: Path) -> list[dict]:
    path = run / "rows.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def newest(job: str, dataset: str, key: Sequence[str], root: Path = RESULTS_DIR, where: Where | None = None
           ) -> list[dict]:  # fmt: skip
    """Per cell (the row's values at `key`), the row of the newest run that measured it, with `run` (the run's
    folder name) added; in the order the cells were first measured. `where`: only the runs whose config it accepts."""
    cells: dict[tuple, dict] = {}
    for run in runs(job, dataset, root, where):
        for row in rows(run):
            cells[tuple(dumps(row.get(k)) for k in key)] = {**row, "run": run.name}
    return list(cells.values())


def used_runs(job: str, dataset: str, cells: Iterable[dict], root: Path = RESULTS_DIR) -> list[dict]:
    """The configs of the runs that `cells` (rows from `newest`) come from, newest first, each with its `run`."""
    names = {c["run"] for c in cells}
    return [{**config(r), "run": r.name} for r in reversed(runs(job, dataset, root)) if r.name in names]
