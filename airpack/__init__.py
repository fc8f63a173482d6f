"""airpack: carry open language models across air gaps, signed and verifiable."""

__version__ = "0.1.0"
