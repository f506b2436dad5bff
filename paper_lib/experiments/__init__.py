"""Per-notebook experiment logic: each notebook calls one module here and only plots."""
