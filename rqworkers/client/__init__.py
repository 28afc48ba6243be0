"""What a producer's program imports: the task message format, Producer, Executor."""
