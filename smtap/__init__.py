"""smtap: the suite's private Python namespace.

Every module is imported as smtap.<layer>.<module> so that no import can ever resolve
to a host's own `sm` package. In a checkout the layers (formats/, sm/, tapdisk/,
toolstack/) sit beside this directory; in an installed tree they sit inside it.
"""
import os

_here = os.path.dirname(os.path.abspath(__file__))
__path__ = [_here]
if not os.path.isdir(os.path.join(_here, "tapdisk")):
    __path__.append(os.path.dirname(_here))
