"""secret: values (passwords) referenced from device-config by uuid."""
from smtap.toolstack.objects import ApiClass, Field, MAP, RW, record_fields

secret = ApiClass("secret", [Field("value", setter=RW), Field("other_config", MAP, setter=RW)])


@secret.method
def create(ctx, record):
    return ctx.store.create("secret", record_fields("secret", record, ["value"]))


@secret.method
def destroy(ctx, self):
    ctx.store.get("secret", self)
    ctx.store.destroy("secret", self)
