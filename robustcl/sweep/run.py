"""One planned run of a sweep executed in this process: pretrain -> finetune -> evaluate -> report."""
from __future__ import annotations

from robustcl.sweep.plan import PlannedRun


def execute_run(planned: PlannedRun, progress: bool) -> None:
    """pretrain (fresh, resumed or overwriting) -> finetune -> evaluate -> report for one run."""
    from robustcl.evaluation.run_eval import evaluate_run
    from robustcl.runs.report import write_report
    from robustcl.train.finetune import finetune
    from robustcl.train.pretrain import pretrain

    run, cfg = planned.run, planned.cfg
    resume = planned.status == "resume"
    redo = not resume and run.root.exists() and any(run.root.iterdir())  # checked: our run, unfinished or --overwrite
    pretrain(cfg, run, resume=resume, overwrite=redo, progress=progress)
    finetune(cfg, run, progress=progress, overwrite=True)  # this flow owns the run
    evaluate_run(cfg, run, progress=progress)
    write_report(run)

