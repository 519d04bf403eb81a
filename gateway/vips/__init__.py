"""One module per protocol; each has a class with `handle(client_stream)` for its VIPs."""
