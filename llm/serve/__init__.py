"""Requests end to end: typed options, checks before loading, generate, chat, batch, bench.

:mod:`.options` holds the typed values the commands build from argv (``RunOptions``,
``SamplingOptions``, ``MeshSpec``, ...), :mod:`.preflight` checks a request on every rank before
any weight is read, :mod:`.generate` loads a model and runs one request, :mod:`.chat` and
:mod:`.batch` run conversations and request files, :mod:`.bench` times a run. Library
functions: no argparse, the ``ControlPlane`` passed in. Imports every room below it.
"""
