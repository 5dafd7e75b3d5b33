"""The ``diffserve`` command: a thin dispatcher onto the services and tools."""
