"""message: alerts about objects (drivers raise them, e.g. on space running low)."""
from smtap.toolstack.objects import ApiClass, Field, DATETIME, INT, now

message = ApiClass("message", [
    Field("name"), Field("priority", INT), Field("cls"), Field("obj_uuid"),
    Field("timestamp", DATETIME), Field("body"),
])


@message.method
def create(ctx, name, priority, cls, obj_uuid, body):
    return ctx.store.create("message", {"name": name, "priority": priority, "cls": cls,
                                        "obj_uuid": obj_uuid, "body": body, "timestamp": now()})


@message.method
def destroy(ctx, self):
    ctx.store.get("message", self)
    ctx.store.destroy("message", self)
