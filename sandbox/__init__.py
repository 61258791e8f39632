"""The sandbox Kubernetes cluster: network namespaces, an API server, a kubelet, kube-proxy and DNS."""
