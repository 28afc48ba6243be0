"""What every process shares and that knows nothing of queues: text, files, globs, backoff,
fork and signals.
"""
