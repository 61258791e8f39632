"""Cluster DNS on the laptop (issue 4).

``names`` (routing by name) and ``cache`` feed the sans-IO core ``resolver`` (actions in
``actions``); ``server`` is its asyncio adapter and ``exchange`` a one-shot DNS client.
``resolv_conf`` parses/renders resolv.conf; ``os_config`` points the OS at the resolver and
restores it, using ``managed_files``, ``resolved``, ``hosts_file`` and ``macos_resolver``.
"""
