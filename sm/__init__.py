"""The SMAPIv1 framework: what every SR driver shares (imported as smtap.sm)."""
