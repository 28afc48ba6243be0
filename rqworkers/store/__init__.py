"""The Redis layer: connections, the Lua scripts and their runner, the queue's keys and moves."""
