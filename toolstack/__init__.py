"""The local XenAPI-compatible toolstack (smtap-xapi) and its `xe` command line.

Development and test only: it never ships to dom0, where the real XAPI runs.
"""
