"""The report's last section: what each artifact is (SHA-256, stage) and where the run's time went."""

from __future__ import annotations

import pandas as pd

from ..rundir import RunDir


def provenance(run: RunDir) -> pd.DataFrame:
    m = run.manifest()
    rows = [{"artifact": k, "sha256": v["sha256"][:16] + "…", "bytes": v["bytes"], "stage": v["stage"]}
            for k, v in sorted(m["artifacts"].items())]  # fmt: skip
    return pd.DataFrame(rows)


def timing(run: RunDir, top: int = 12) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Where the time went: (seconds per notebook of the last run, the ``top`` longest stages
    recorded, each its own time without the stages it needed computed meanwhile). A stage reused from
    the cache keeps the duration of the run that computed it."""
    m = run.manifest()
    nbs = pd.DataFrame([{"notebook": k, "status": v["status"], "seconds": v["seconds"]} for k, v in m.get("notebooks", {}).items()])
    stages = [{"stage": k, "seconds": v["seconds"], "finished": v["finished"]} for k, v in m["stages"].items() if v.get("seconds") is not None]
    stages = pd.DataFrame(stages, columns=["stage", "seconds", "finished"]).sort_values("seconds", ascending=False).head(top)
    return nbs, stages.reset_index(drop=True)
