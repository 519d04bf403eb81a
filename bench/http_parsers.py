"""What h11 costs an ITI-18 exchange, beside httptools (llhttp, the parser uvicorn uses): the
request read and written again, the response read and written again, as the XDS relay does.
Measures the most a compiled parser could take off an ITI-18's CPU; compare it with the CPU
per request of `xds.py` (the same machine). Needs `pip install httptools` (not a dependency).

    python3 bench/http_parsers.py [--exchanges 5000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h11  # noqa: E402

from protocols import soap  # noqa: E402

ENVELOPE = soap.build_find_documents("PAT0001^^^&1.2.3.4.5&ISO", "urn:uuid:medgate-bench")
REQUEST = (b"POST /registry HTTP/1.1\r\nHost: registry.hospital.local:8080\r\n"
           b'Content-Type: application/soap+xml; charset=UTF-8; '
           b'action="urn:ihe:iti:2007:RegistryStoredQuery"\r\n'
           b"Content-Length: %d\r\n\r\n" % len(ENVELOPE)) + ENVELOPE
ANSWER = b"<AdhocQueryResponse>" + b"x" * 3000 + b"</AdhocQueryResponse>"
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/soap+xml; charset=UTF-8\r\n"
            b"Content-Length: %d\r\n\r\n" % len(ANSWER)) + ANSWER


def with_h11() -> int:
    """Both messages into h11 events and out again (the relay's way)."""
    server, client = h11.Connection(h11.SERVER), h11.Connection(h11.CLIENT)
    server.receive_data(REQUEST)
    written = 0
    while not isinstance(event := server.next_event(), h11.EndOfMessage):
        written += len(client.send(event) or b"")
    written += len(client.send(event) or b"")
    client.receive_data(RESPONSE)
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        written += len(server.send(event) or b"")
    return written + len(server.send(event) or b"")


class _Message:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, data: bytes) -> None:
        self.body.append(data)


def with_httptools() -> int:
    """Both messages through llhttp, heads written again by hand."""
    import httptools

    request = _Message()
    httptools.HttpRequestParser(request).feed_data(REQUEST)
    head = b"POST /registry HTTP/1.1\r\n" + b"".join(
        b"%s: %s\r\n" % header for header in request.headers) + b"\r\n"
    response = _Message()
    parser = httptools.HttpResponseParser(response)
    parser.feed_data(RESPONSE)
    head2 = b"HTTP/1.1 %d OK\r\n" % parser.get_status_code() + b"".join(
        b"%s: %s\r\n" % header for header in response.headers) + b"\r\n"
    return len(head) + sum(map(len, request.body)) + len(head2) + sum(map(len, response.body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exchanges", type=int, default=5000)
    args = parser.parse_args()
    for name, exchange in (("h11", with_h11), ("httptools", with_httptools)):
        exchange()
        started = time.perf_counter()
        for _ in range(args.exchanges):
            exchange()
        spent = (time.perf_counter() - started) / args.exchanges * 1e6
        print(f"{name:10s} {spent:6.1f} us per ITI-18 exchange (request and response, "
              f"read and written)")


if __name__ == "__main__":
    main()
