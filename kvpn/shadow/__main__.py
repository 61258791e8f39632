"""Entry point of the shadow pod: ``python -m kvpn.shadow``."""

from kvpn.shadow.agent import main

raise SystemExit(main())
