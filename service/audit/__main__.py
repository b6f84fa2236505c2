"""`python -m service.audit`: audit an allow-listed model server, bare and behind the guard, from the command line.

    MG_PROXY__UPSTREAMS='{"user-model": {"url": "http://127.0.0.1:9100", "model": "mnist-nchw"}}' \\
    python -m service.audit --target user-model --n 100 --out docs/audit-example
    python -m service.audit --target colour-model --sample shapes    # an upstream of "dataset": "shapes"

The allow-list is the service's (MG_AUDIT__TARGETS, default every proxied upstream in MG_PROXY__UPSTREAMS); the
guarded pipelines run in this process through the service's own proxy. Writes report.md, report.json and the SVG
plots to --out, printing a progress bar as it goes. The sample must hold images of the target's dataset (its
upstream's `dataset`, e.g. the shipped `shapes` slice for a 3×32×32 colour upstream).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from service.audit.spec import SHIPPED, AuditError, AuditSpec, PipelineSpec, Threat, check_caps, check_threats
from service.config import Settings
from service.datasets import DatasetSpec

if TYPE_CHECKING:
    from service.audit.data import Sample

BAR = 30


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (the spec's fields as flags)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", help="an allow-listed model name (required unless --rerender)")
    p.add_argument("--sample", default="mnist", help=f"{' | '.join(SHIPPED)} (shipped slices, of the target's "
                   "dataset), an .npz, or a class folder")  # fmt: skip
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--linf", type=float, nargs="*", default=[0.3], help="L∞ budgets ε (none: no L∞ threat)")
    p.add_argument("--l2", type=float, nargs="*", default=[2.0], help="L2 budgets ε (none: no L2 threat)")
    p.add_argument("--attacks", nargs="*", choices=["square", "hsj", "transfer"], help="default: by the answers")
    p.add_argument("--queries", type=int, default=1000, help="Square's queries per image")
    p.add_argument("--hsj-n", type=int, default=10)
    p.add_argument("--hsj-queries", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=150, help="the substitute's held-out seed images")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--pipeline", action="append", metavar="DEFENSE[:STEPS:RESTARTS[:N:QUERIES:ROUNDS]]",
                   help="a guarded pipeline, optionally on fewer images, queries and substitute rounds (repeatable; "
                   "default defense-gan:50:2)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-queries", type=int, help="the attacks' and substitutes' total budget (default: the cap)")
    p.add_argument("--timing-images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/audits/cli"))
    p.add_argument("--rerender", action="store_true", help="only redraw report.md and the plots from report.json")
    return p.parse_args(argv)


def spec_of(a: argparse.Namespace) -> AuditSpec:
    threats = [Threat(norm=n, eps=e) for n, e in (("linf", a.linf), ("l2", a.l2)) if e]
    pipelines = [_pipeline(p) for p in (a.pipeline or ["defense-gan:50:2"])]
    sample = a.sample if a.sample in SHIPPED else "upload"
    return AuditSpec(target=a.target, sample=sample, n=a.n, threats=threats, attacks=a.attacks, queries=a.queries,
                     hsj_n=a.hsj_n, hsj_queries=a.hsj_queries, seeds=a.seeds, rounds=a.rounds, pipelines=pipelines,
                     repeats=a.repeats, max_queries=a.max_queries, timing_images=a.timing_images,
                     seed=a.seed)  # fmt: skip


def _pipeline(text: str) -> PipelineSpec:
    """DEFENSE[:STEPS:RESTARTS[:N:QUERIES:ROUNDS]] (an empty field: the default)."""
    parts = text.split(":")
    keys = ("steps", "restarts", "n", "queries", "rounds")
    values = {k: int(v) for k, v in zip(keys, parts[1:], strict=False) if v}
    return PipelineSpec(defense=parts[0], **values)  # type: ignore[arg-type]


def sample_of(a: argparse.Namespace, spec: AuditSpec, s: Settings, ds: DatasetSpec) -> Sample:
    """--sample: a shipped slice, a class folder, or an .npz or .zip file, as images of `ds` (the target's)."""
    from service.audit.data import from_folder, load_sample

    path = Path(a.sample)
    if spec.sample != "upload":
        return load_sample(a.sample, s, ds=ds)
    if path.is_dir():
        return from_folder(path, s, ds)
    return load_sample("upload", s, path.read_bytes(), "zip" if path.suffix == ".zip" else "npz", ds)


def bar(done: int, total: int, step: str, started: float) -> None:
    k = int(BAR * done / max(total, 1))
    line = f"\r[{'#' * k}{'.' * (BAR - k)}] {done}/{total} {time.time() - started:6.0f} s  {step[:70]:<70}"
    print(line, end="", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run one audit in this process and write its report."""
    import threading

    import torch

    from service.audit.host import in_process
    from service.audit.report import write_report
    from service.audit.runner import Progress, new_doc, run_audit
    from service.audit.target import Meter, target_spec
    from service.config import get_settings

    a = parse(argv)
    if a.rerender:
        import json

        write_report(json.loads((a.out / "report.json").read_text()), a.out)
        return 0
    if not a.target:
        raise AuditError("--target is required")
    torch.set_num_threads(a.threads)
    s = get_settings()
    spec = spec_of(a)
    check_caps(spec, s)
    started, progress, meter = time.time(), Progress(), Meter(spec.max_queries)
    done = threading.Event()

    def show() -> None:  # on each change, and every 30 s
        last, shown = None, 0.0
        while not done.wait(1.0):
            now = (progress.done, progress.total, progress.step)
            if now != last or time.time() - shown > 30:
                bar(*now, started)
                last, shown = now, time.time()

    threading.Thread(target=show, daemon=True).start()
    with in_process(s) as host:
        ds = target_spec(spec.target, host)  # the sample's images must be of the target's dataset
        check_threats(spec, ds)
        sample = sample_of(a, spec, s, ds)
        doc = new_doc(spec, sample, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        doc["info"]["command"] = "python -m service.audit " + shlex.join(sys.argv[1:] if argv is None else argv)
        run_audit(spec, sample, host, meter, progress, doc)
    done.set()
    bar(progress.total, progress.total, "done", started)
    doc["info"]["minutes"] = round((time.time() - started) / 60, 1)
    write_report(doc, a.out)
    print(f"\naudit: wrote {a.out}/report.md, report.json and the plots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AuditError as exc:
        print(f"audit: {exc}", file=sys.stderr)
        sys.exit(2)
