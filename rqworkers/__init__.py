"""rqworkers: reliable Redis list consumers, one supervised worker process per (host, queue)."""

from rqworkers.client.executor import Executor, TaskFuture
from rqworkers.client.producer import Producer
from rqworkers.client.tasks import TaskError

__all__ = ["Executor", "Producer", "TaskError", "TaskFuture"]
__version__ = "0.1.0"
