"""SR drivers: one module per SR type, <Type>SR.py, each ending with main()."""
