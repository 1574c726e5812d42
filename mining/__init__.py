"""mining: parallel sentence pairs out of monolingual corpora."""

__version__ = "0.1.0"
