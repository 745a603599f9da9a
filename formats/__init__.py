"""Image formats, a layer of their own (smtap.formats): below both the engine
(smtap.tapdisk) and the storage manager (smtap.sm), importing neither.

vhd.py is the VHD format as tapdisk and vhd-util write it; vhdcheck.py validates and
dumps it, vhdresize.py grows it (fast or journalled); vhdutil.py and tdutil.py are the
`vhd-util` and `td-util` command lines over them.
"""
