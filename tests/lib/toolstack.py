"""Helpers shared by the toolstack tests."""
import pytest
import XenAPI

GiB = 1 << 30


def failure(fn, *args):
    """The ErrorDescription of a XenAPI call that must fail."""
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return e.value.details
