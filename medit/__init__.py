"""medit: correct facts in medical language models, prove the edits are safe, benchmark editors."""

__version__ = "0.1.0"
