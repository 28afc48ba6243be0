"""Peer task queues (RQ, Celery, Dramatiq, arq) set up to run the bench's no-op job.

These modules run under the interpreter that has the peers installed (`bench/requirements.txt`,
best in its own virtualenv: arq pins redis-py < 6), never in the bench's own process. They
import nothing from rqworkers and nothing but their peer library and redis-py.
"""
