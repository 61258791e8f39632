"""kvpn: a pure-Python developer VPN for Kubernetes."""
