"""The suite's version at run time (VERSION at the repo root is not installed; a test
keeps the two equal)."""
VERSION = "0.1.0"
