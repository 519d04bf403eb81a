"""The network layer: channels, TLS, the relay's send and receive helpers, HTTP, PROXY and limits.

Imports only protocols/, config/, the balancer and the package root; every VIP, check and service
part above it talks to sockets through here.
"""
