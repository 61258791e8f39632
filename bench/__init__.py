"""kvpn's benchmark: kvpn side by side with the bare kernel, ``ssh -L`` and sshuttle (issue 8).

``scripts/bench`` runs :mod:`bench.run`; results are appended to ``bench/RESULTS.md``.
"""
