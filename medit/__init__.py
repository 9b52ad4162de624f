"""medit: correct facts in medical language models, prove the correction is safe, benchmark editors."""

__version__ = "0.1.0"
