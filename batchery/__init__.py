"""The ``batchery`` command: the one place that ties the producer, the gateway, the worker and
the benchmarks together (and the processes it starts for a demo or a test).
"""
