"""Batchery's HTTP gateway: a producer like any other, behind an HTTP API and a web page.

Imports ``producer`` (the client library and the shared core), never ``worker``: no TensorFlow.
"""
