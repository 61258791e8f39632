"""Entry point of the shadow image: ``python -m kvpn.shadow`` (the SSH agent) or
``python -m kvpn.shadow router`` (the ``kvpn mesh`` router, :mod:`kvpn.shadow.mesh_router`)."""

import sys

if sys.argv[1:2] == ["router"]:
    from kvpn.shadow.mesh_router import main as router_main

    raise SystemExit(router_main())

from kvpn.shadow.agent import main

raise SystemExit(main())
