"""The worker process: its loops, settling, the timer, handlers, the task runner, the
scoreboard.
"""
