"""rqworkers: reliable Redis list consumers, one supervised worker process per (host, queue)."""

__version__ = "0.1.0"
