"""session: login (any password for root, as a local superuser) and logout."""
from smtap.toolstack import errors
from smtap.toolstack.errors import ApiError
from smtap.toolstack.objects import ApiClass, Field, BOOL, DATETIME, MAP, REF, SET, RW, now

session = ApiClass("session", [
    Field("this_host", REF), Field("this_user"), Field("last_active", DATETIME),
    Field("pool", BOOL), Field("other_config", MAP, setter=RW),
    Field("is_local_superuser", BOOL), Field("subject", REF),
    Field("validation_time", DATETIME), Field("auth_user_sid"), Field("auth_user_name"),
    Field("rbac_permissions", SET), Field("parent", REF), Field("originator"),
    Field("client_certificate", BOOL),
    Field("sm_sr", hidden=True),   # the SR whose driver this session was given to
])

USERS = ("root",)


def login(ctx, uname, originator):
    if uname not in USERS:
        raise ApiError(errors.SESSION_AUTHENTICATION_FAILED, uname,
                       "Authentication failure")
    return ctx.store.create("session", {
        "this_host": ctx.ts.host, "this_user": uname, "is_local_superuser": True,
        "last_active": now(), "validation_time": now(), "originator": originator,
        "auth_user_name": uname})


@session.method(session=False)
def login_with_password(ctx, uname, pwd, version="", originator=""):
    return login(ctx, uname, originator)


@session.method(session=False)
def slave_local_login_with_password(ctx, uname, pwd):
    return login(ctx, uname, "")


@session.method
def logout(ctx):
    ctx.store.destroy("session", ctx.session_ref)


session.method(logout, name="local_logout")
