"""The shadow agent that runs in the shadow pod (``python -m kvpn.shadow``)."""
