"""Sans-IO protocol codecs: bytes in, events or bytes out. No trio, no sockets, no clocks."""
