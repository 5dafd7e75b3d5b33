"""Operator tools run through the ``diffserve`` command: ``train-discriminator``,
``calibrate`` (f(t) of a cascade) and ``profile`` (batch latency on this device); and what the
opt-in compose and chart harnesses share (``compose_files``, ``smoke``)."""
