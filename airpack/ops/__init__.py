"""The public Python API: one module per operation, keyword-only options, progress by callback."""
