"""The manager process: supervision of the slots, the pid file."""
