"""task: one per driver call (its ref goes to the driver as subtask_of)."""
from smtap.toolstack.objects import ApiClass, Field, DATETIME, FLOAT, MAP, REF, SET, RW, now

task = ApiClass("task", [
    Field("name_label"), Field("name_description"), Field("allowed_operations", SET),
    Field("current_operations", MAP), Field("created", DATETIME), Field("finished", DATETIME),
    Field("status", default="pending"), Field("resident_on", REF), Field("progress", FLOAT),
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
