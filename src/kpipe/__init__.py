"""kpipe: one pipeline for Kaggle image-classification competitions.

Stages hand over through files: audit -> folds -> train -> relabel -> infer -> submit.
Usage: ``kpipe --help``.
"""

__version__ = "0.1.0"
