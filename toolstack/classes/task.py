"""task: one per driver call (its ref goes to the driver as subtask_of), one per Async
call, and the ones clients (upstream sm's GC) create and report progress on."""
from smtap.toolstack.objects import (ApiClass, Field, DATETIME, FLOAT, MAP, REF, SET, STRING,
                                     RW, now)

STATUSES = ("pending", "success", "failure", "cancelling", "cancelled")

task = ApiClass("task", [
    Field("name_label"), Field("name_description"), Field("allowed_operations", SET),
    Field("current_operations", MAP), Field("created", DATETIME), Field("finished", DATETIME),
    Field("status", default="pending", choices=STATUSES), Field("resident_on", REF),
    Field("progress", FLOAT),
    Field("type"), Field("result"), Field("error_info", SET), Field("other_config", MAP, setter=RW),
    Field("subtask_of", REF), Field("subtasks", SET, reverse=("task", "subtask_of")),
    Field("backtrace"),
], by_name_label=True)


@task.method
def create(ctx, label, description):
    return ctx.store.create("task", {"name_label": label, "name_description": description,
                                     "created": now(), "resident_on": ctx.ts.host})


@task.method
def destroy(ctx, self):
    ctx.store.get("task", self)
    ctx.store.destroy("task", self)


@task.method
def cancel(ctx, self):
    ctx.store.update("task", self, {"status": "cancelled", "finished": now()})


@task.method
def set_status(ctx, self, value: STRING):
    """As XAPI: leaving "pending" also stamps the finish time."""
    value = task.fields["status"].coerce(value)
    changes = {"status": value}
    if value != "pending":
        changes["finished"] = now()
    ctx.store.update("task", self, changes)


@task.method
def set_progress(ctx, self, value: FLOAT):
    ctx.store.update("task", self, {"progress": task.fields["progress"].coerce(value)})
