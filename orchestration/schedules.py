"""``scheduled_retraining``: cron from params.yaml ``orchestration.retraining_cron``, STOPPED by default.

Each tick derives a fresh seed from its scheduled time, so a tick retried by the daemon reuses its seed.
"""

import dagster as dg

from orchestration.jobs import retraining_job
from orchestration.settings import OrchestrationSettings


def build_retraining_schedule(settings: OrchestrationSettings) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="scheduled_retraining",
        job=retraining_job,
        cron_schedule=settings.retraining_cron,
        execution_timezone=settings.retraining_timezone,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description=f"Every `{settings.retraining_cron}` ({settings.retraining_timezone}): "
        f"`dvc exp run --temp -S {settings.retraining_seed_param}=<fresh seed>`; a promotion by its champion "
        "stage is branched and registered as prod.",
    )
    def _scheduled_retraining(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        seed = int(context.scheduled_execution_time.timestamp()) % (2**31)
        return dg.RunRequest(
            run_key=f"retraining-{seed}",
            run_config={"ops": {"retraining_experiment": {"config": {"seed": seed}}}},
            tags={"retraining/seed": str(seed)},
        )

    return _scheduled_retraining
