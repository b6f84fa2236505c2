"""Robustness audits of a model server over the Open Inference Protocol, bare and behind the guard (docs/audit.md).

    spec = AuditSpec(target="user-model", n=100)           # what to run (service.audit.spec; caps checked)
    sample = load_sample(spec.sample, settings, ds=target_spec(spec.target, host))  # of the target's dataset
    doc = run_audit(spec, sample, host, progress)          # the attacks, judged (service.audit.runner)
    write_report(doc, folder)                              # Markdown + JSON + SVG plots (service.audit.report)
    jobs = AuditJobs(settings, host)                       # POST /v1/audits's queue (service.audit.jobs)

    python -m service.audit --target user-model --n 100    # the same from the command line, with a progress bar

Images follow the target's dataset (`service.datasets.DatasetSpec`: C×H×W, classes; e.g. 3×32×32 for `shapes`).
The target is a name on the operator's allow-list (`settings.audit.targets`, default every proxied upstream), never
a URL from the caller. The attacks are `service.attacks.query`'s, the suite `training.blackbox` evaluates with.
"""
