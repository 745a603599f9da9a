"""SR drivers the tests install or run as programs (not collected: no test_ prefix)."""
