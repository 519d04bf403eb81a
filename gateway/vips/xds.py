"""IHE XDS.b VIP: SOAP 1.2 over HTTP/1.1 with keep-alive, balanced and routed per request.

Rules kept here (docs/xds.md; ITI TF-2 §3.18, §3.41-43; RFC 9112 for the HTTP):
- Route by the SOAP action (Content-Type `action`, else wsa:Action peeked from the first bytes
  of the body) to the members of its role (xds_routes.py: registry, repository, imaging source,
  XCA gateway, PIX, PDQ; "both" is a registry and a repository); ITI-43 and RAD-69 by their
  RepositoryUniqueId, ITI-38/39 by their homeCommunityId, when members name theirs. An action
  with no route goes to `default_role`, else only to "both" members, else a 400 Fault.
- Bodies, MTOM included, are streamed both ways, a chunk at a time: memory does not grow with
  the size of a document.
- Queries (ITI-18, 38, 39, 43, 45, 47, RAD-69) are retried on the next member when one fails
  before its response starts; writes (ITI-41, 42, 44, 57, 61, 62 and actions the gateway does
  not know) only when the connection failed before any byte was sent.
- No member: HTTP 503 with Retry-After and a SOAP 1.2 Fault (env:Receiver) naming the VIP.
- Expect: 100-continue is answered by the gateway; X-Forwarded-For is added; Host is kept.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import h11
import trio

from gateway.net import http
from gateway.net.channel import SpliceBroken, splice_exactly
from gateway.balancer import Member, NoMemberAvailable
from gateway.net.link import Link
from gateway.net.limits import REFUSE_TIMEOUT, ClientSlot
from gateway.net.peer import Peer
from gateway.net.relay import MemberFailed, clock_reader, dispatch, strike
from gateway.config import VipConfig
from gateway.vips import PooledVipHandler
from gateway.vips.shadow import RESPONSE_KEPT, Shadow, XdsCopy, XdsShadow
from gateway.vips.xds_routes import XdsRoute, XdsRoutes
from protocols import soap

log = logging.getLogger("medgate.xds")

REPLAY_LIMIT = 1024 * 1024  # an idempotent request body up to this size is kept for a retry
PEEK_LIMIT = 65536  # bytes of body read to find wsa:Action when the Content-Type has none
FLUSH_AT = 65536  # bytes of a request or response gathered before they are sent on
# A request body of a declared length from this size on is read from the socket as it is,
# past h11 (whose receive buffer costs about 1 ms of CPU per MB: bench/README.md): an ITI-41's
# document is relayed, not parsed. Its end is its length; a chunked body still goes to h11.
RAW_BODY_AT = 262144
RAW_READ = 262144  # bytes asked of the socket at a time for such a body
RETRY_AFTER = "5"
_BY_ROLE = soap.RouteBy.ANY  # tested on every request: see balancer._UP
REFUSE_WAIT = REFUSE_TIMEOUT / 2  # for the head of a request that will get a 503


class _ClientError(Exception):
    """End this client connection (after answering, when possible); the text says why."""


class _RequestLost(Exception):
    """A member failed after part of a write was sent: the client must decide, not the gateway."""


@dataclass(eq=False)  # compared by identity: the idle list removes the one taken
class _Upstream:
    stream: Link
    connection: h11.Connection
    idle_since: float = 0.0
    head: h11.Response | None = None  # the response head of the current exchange
    origin: tuple[str, int] | None = None  # the client its PROXY header named (send_proxy)


@dataclass
class _Exchange:
    """One request through the gateway."""

    client: Link
    connection: h11.Connection  # server side, to the client
    request: h11.Request
    peer: Peer
    # The request's headers, names lower-case: h11's Headers costs two Python calls a header
    # at each pass over it, this list none (and a request's are looked through six times)
    fields: list[tuple[bytes, bytes]]
    action: str = ""
    prefix: list[bytes] | None = None  # body bytes already read from the client
    body_done: bool = False  # the client's EndOfMessage has been read
    length: int | None = None  # the body's declared length (Content-Length), if any
    raw_left: int | None = None  # body bytes still to read past h11 (RAW_BODY_AT); None: h11
    response_spliced: bool = False  # the response's body went to the client past h11, whole
    kept: bytearray | None = None  # the response's body, kept to compare a shadow's with
    bytes_in: int = 0
    bytes_out: int = 0
    status: int = 0


class XdsVip(PooledVipHandler):
    """Handles each client connection of one `protocol = "xds"` VIP."""

    shadow_type = XdsShadow

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clock: Callable[[], float] = trio.current_time  # handle: the run's clock_reader
        self._records = self.audit.layout(
            "xds", "vip", "client", "action", "member", "status", "tries", "bytes_in",
            "bytes_out", "duration_ms", "outcome")

    async def handle(self, client: Link, slot: ClientSlot) -> None:
        """Serve requests on one client connection until it closes, idles out or breaks.

        The waits for a request are bounded by `deadlines` (a heap entry each, not a cancel
        scope: about 45 Python calls); the connection's one scope is what an eviction of the
        idle client cancels."""
        client_name = slot.client
        clock = self._clock = clock_reader()
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=http.MAX_HEAD)
        idle = self.vip.header_timeout  # a new client that says nothing is not kept long
        served = False  # a response went out: the client's next request cannot be here yet
        try:
            with trio.CancelScope() as waiting:
                while True:
                    event, fields = await http.next_request(
                        client, connection, idle_timeout=idle,
                        header_timeout=self.vip.header_timeout, idle=slot.idle,
                        deadlines=self.deadlines, within=waiting, clock=clock, answer=served)
                    if not isinstance(event, h11.Request):
                        return  # ConnectionClosed
                    exchange = _Exchange(client, connection, event, slot.peer, fields,
                                         length=_declared_length(fields))
                    await self._serve(exchange, client_name)
                    idle, served = self.vip.client_timeout, True
                    if _done_past_h11(exchange):
                        # A body went past h11, which still waits for it: the next request
                        # on a connection of its own state machine (nothing after the body
                        # was read).
                        connection = h11.Connection(h11.SERVER,
                                                    max_incomplete_event_size=http.MAX_HEAD)
                        continue
                    if (connection.our_state is not h11.DONE
                            or connection.their_state is not h11.DONE):
                        return
                    connection.start_next_cycle()
        except trio.TooSlowError:
            log.info("vip=%s client=%s idle for %gs: closed", self.vip.name, client_name, idle)
        except http.SlowHead as exc:
            log.warning("vip=%s client=%s %s: closed", self.vip.name, client_name, exc)
        except h11.RemoteProtocolError as exc:
            reason = http.reason_of(exc)
            log.warning("vip=%s client=%s bad HTTP request, refused: %s", self.vip.name,
                        client_name, reason)
            self.pool.count_refused()
            await self._reply_fault(connection, client, exc.error_status_hint or 400,
                                    "Sender", f"bad HTTP request: {reason}", within=REFUSE_WAIT)
        except (_ClientError, http.PeerGone) as exc:
            log.warning("vip=%s client=%s connection ended: %s", self.vip.name, client_name, exc)

    async def refuse(self, client: Link, client_name: str, why: str) -> None:
        """Over max_clients: 503, Retry-After and a SOAP Fault, once the request head is in."""
        self.pool.count_refused()
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=http.MAX_HEAD)
        try:
            event, _ = await http.next_request(client, connection, idle_timeout=REFUSE_WAIT,
                                               header_timeout=REFUSE_WAIT)
        except (trio.TooSlowError, http.SlowHead, http.PeerGone, h11.RemoteProtocolError):
            event = None
        log.warning("vip=%s client=%s refused%s: %s", self.vip.name, client_name,
                    " (503)" if isinstance(event, h11.Request) else ", closed", why)
        if isinstance(event, h11.Request):
            await self._reply_fault(connection, client, 503, "Receiver", f"medgate: {why}",
                                    subcode="TooManyClients", within=REFUSE_WAIT,
                                    extra=[("Retry-After", RETRY_AFTER)])

    async def _serve(self, exchange: _Exchange, client_name: str) -> None:
        started = self._clock()
        content_type = http.header(exchange.fields, b"content-type")
        tries: list[str] = []
        member_name = "-"
        outcome = ""
        try:
            exchange.action = (soap.action_from_content_type(content_type) or "") if content_type else ""
            if not exchange.action:
                exchange.action = await self._peek_action(exchange, content_type)
            route = self.routes.route(exchange.action)
            among = list(route.members)
            if not among:
                raise soap.SoapError(f"action {exchange.action} is not served by this VIP")
            for name in among:  # any(), without the generator and its GeneratorExit
                if self.pool.member(name).accepts_persisted:
                    break
            else:
                self.pool.count_refused()
                raise NoMemberAvailable(self.pool.name, self.pool.why_none(among))
            await self._continue(exchange)
            # A query's body is held to try the next member with it; a write's only to copy it
            # to shadows (shadow_writes): a write never goes to a second member
            shadows = self._shadows_for(route)
            held = bool(route.query or shadows) and await self._buffer_body(exchange)
            replayable = route.query and held
            if route.route_by != _BY_ROLE:
                among = self._named_members(exchange, content_type, route, replayable)

            async def attempt(member: Member):
                tries.append(member.name)
                return await self._forward(member, exchange, replayable)

            member, upstream = await dispatch(self.pool, exchange.peer.host, attempt, among=among,
                                              now=self._clock())
            member_name = member.name
            if shadows and held:
                exchange.kept = bytearray()
            keep = False
            try:
                keep = await self._relay_response(exchange, member, upstream)
            finally:
                self.pool.drop_conn(member, exchange.bytes_in, exchange.bytes_out)
                self._release(member, upstream, keep)
            outcome = f"HTTP {exchange.status}"
            if exchange.kept is not None:
                self._copy_to_shadows(shadows, exchange, member)
        except soap.SoapError as exc:
            outcome, exchange.status = f"refused: {exc.reason}", 400
            self.pool.count_refused()
            await self._exchange_fault(exchange, 400, "Sender", exc.reason,
                                       subcode="UnroutableRequest")
        except NoMemberAvailable as exc:
            role = self.routes.route(exchange.action).describe()
            why = f"vip {self.vip.name!r}: no {role} member can take it: {exc.reason.value}"
            outcome, exchange.status = f"503: {exc.reason.value}", 503
            await self._exchange_fault(exchange, 503, "Receiver", why,
                                       subcode="NoMemberAvailable",
                                       extra=[("Retry-After", RETRY_AFTER)])
        except _RequestLost as exc:
            outcome, exchange.status = f"502: {exc}", 502
            await self._exchange_fault(exchange, 502, "Receiver",
                                       f"vip {self.vip.name!r}: {exc}", subcode="MemberFailed")
        finally:
            name = soap.transaction_name(exchange.action)
            duration = self._clock() - started
            # A request answered by a member is counted in the summary line; others are told.
            level = logging.DEBUG if 200 <= (exchange.status or 0) < 300 else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "vip=%s client=%s %s %s action=%s member=%s tries=%d bytes_in=%d "
                        "bytes_out=%d duration=%.3fs outcome=%s", self.vip.name, client_name,
                        exchange.request.method.decode(), exchange.request.target.decode(), name,
                        member_name, len(tries), exchange.bytes_in, exchange.bytes_out,
                        duration, outcome or "aborted")
            self._records.record(self.vip.name, client_name, name,
                                 None if member_name == "-" else member_name,
                                 exchange.status or None, len(tries), exchange.bytes_in,
                                 exchange.bytes_out, round(duration * 1000, 1),
                                 outcome or "aborted")

    # -- shadows

    def _shadows_for(self, route: XdsRoute) -> list[Shadow]:
        """The shadows a request of `route` is copied to: one that goes by role alone, to the
        shadows of that role; a write only with shadow_writes (it changes their store)."""
        if not self.shadows or route.route_by != _BY_ROLE:
            return []
        return [shadow for shadow in self.shadows.values()
                if shadow.on and shadow.config.role.serves(route.role)
                and (route.query or shadow.copies_everything)]

    def _copy_to_shadows(self, shadows: list[Shadow], exchange: _Exchange,
                         member: Member) -> None:
        """The request and the member's response (the client has it), to each shadow."""
        kept = exchange.kept
        assert kept is not None  # the caller looks
        body = b"".join(exchange.prefix or ())
        try:
            answer: soap.RegistryResponse | None = soap.parse_registry_response(bytes(kept))
        except soap.SoapError:
            answer = None
        self._to_shadows(XdsCopy(soap.transaction_name(exchange.action), soap.message_id(body),
                                 member.name, exchange.request, body, exchange.status, answer),
                         shadows)

    # -- routing

    def reconfigure(self, vip: VipConfig) -> None:
        super().reconfigure(vip)
        self.routes = XdsRoutes(vip)

    def _named_members(self, exchange: _Exchange, content_type: str, route: XdsRoute,
                       whole: bool) -> list[str]:
        """The members the request's own identifier names (ITI-43 and RAD-69: the repository,
        ITI-38/39: the community), when members of its role have one set; SoapError (a Sender
        fault) when none of them is the one named."""
        ids = {name: route.member_id(self.members[name]) for name in route.members}
        if not any(ids.values()):
            return list(route.members)
        name, id_name = soap.transaction_name(exchange.action), route.id_name()
        if not whole:
            raise soap.SoapError(f"an {name} request over {REPLAY_LIMIT} bytes is not read, so "
                                 f"its {id_name} cannot be routed")
        wanted = set(soap.routing_ids(soap.soap_envelope_of(
            b"".join(exchange.prefix or ()), content_type or "application/soap+xml"),
            route.route_by))
        if len(wanted) != 1 or "" in wanted:
            raise soap.SoapError(f"{name} request without a {id_name}" if wanted <= {""} else
                                 f"one {name} request names {id_name}s "
                                 f"{', '.join(sorted(wanted - {''}))}: send one request per "
                                 f"{id_name}")
        named = wanted.pop()
        chosen = [member for member, unique_id in ids.items() if unique_id == named]
        if not chosen:
            known = ", ".join(sorted({unique_id for unique_id in ids.values() if unique_id}))
            raise soap.SoapError(f"{id_name} {named} names no {route.describe()} member of vip "
                                 f"{self.vip.name!r} (known: {known})")
        return chosen

    # -- the client's side

    async def _continue(self, exchange: _Exchange) -> None:
        # curl (and most SOAP stacks) wait 1 s for this before sending a large body.
        if exchange.connection.they_are_waiting_for_100_continue:
            await http.send(exchange.client, exchange.connection,
                            h11.InformationalResponse(status_code=100, headers=[],
                                                      reason=b"Continue"))

    async def _client_body(self, exchange: _Exchange) -> bytes | None:
        """The next piece of the client's body, None at its end."""
        if exchange.body_done:
            return None
        if exchange.raw_left is not None:
            return await self._raw_body(exchange)
        if exchange.length is not None and exchange.length >= RAW_BODY_AT:
            event = exchange.connection.next_event()  # what h11 has buffered, then raw
            if event is h11.NEED_DATA:
                exchange.raw_left = exchange.length - exchange.bytes_in
                return await self._raw_body(exchange)
        else:
            event = exchange.connection.next_event()  # a body h11 holds whole (ITI-18's)
            if event is h11.NEED_DATA:                # costs no reader
                try:
                    event = await http.next_event(exchange.client, exchange.connection,
                                                  timeout=self.vip.client_timeout)
                except trio.TooSlowError:
                    raise self._client_slow("sent nothing of its request") from None
        if isinstance(event, h11.Data):
            exchange.bytes_in += len(event.data)
            return event.data
        if isinstance(event, h11.EndOfMessage):
            exchange.body_done = True
            return None
        raise _ClientError("the client closed the connection in the middle of its request")

    async def _raw_body(self, exchange: _Exchange) -> bytes | None:
        """The next piece of a body read past h11: at most what its length leaves, so a
        pipelined next request stays unread; None once it is all here."""
        left = exchange.raw_left
        assert left is not None
        if not left:
            exchange.body_done = True
            return None
        try:
            data = await http.receive(exchange.client, min(left, RAW_READ),
                                      trio.current_time() + self.vip.client_timeout)
        except trio.TooSlowError:
            raise self._client_slow("sent nothing of its request") from None
        if not data:
            raise _ClientError("the client closed the connection in the middle of its request")
        exchange.raw_left = left - len(data)
        exchange.bytes_in += len(data)
        return cast(bytes, data)  # a Link gives bytes (a bytearray only as trio's type allows)

    async def _peek_action(self, exchange: _Exchange, content_type: str) -> str:
        await self._continue(exchange)
        peek = soap.ActionPeek(content_type or "application/soap+xml", PEEK_LIMIT)
        exchange.prefix = []
        while (data := await self._client_body(exchange)) is not None:
            exchange.prefix.append(data)
            if (action := peek.feed(data)) is not None:
                return action
        raise soap.SoapError("the request has no SOAP action (Content-Type action or wsa:Action)")

    async def _buffer_body(self, exchange: _Exchange) -> bool:
        """Read the whole body when it is small enough to replay; False when it is not."""
        exchange.prefix = exchange.prefix or []
        size = sum(map(len, exchange.prefix))
        while size <= REPLAY_LIMIT:
            data = await self._client_body(exchange)
            if data is None:
                return True
            exchange.prefix.append(data)
            size += len(data)
        return False

    async def _exchange_fault(self, exchange: _Exchange, status: int, code: str, reason: str,
                              **more) -> None:
        """The Fault that ends an exchange, which may go on to the next request when its body
        was read whole past h11; _ClientError for a client that does not read it."""
        if not await self._reply_fault(exchange.connection, exchange.client, status, code,
                                       reason, within=self.vip.client_timeout,
                                       body_read=exchange.raw_left == 0, **more):
            raise self._client_slow("read nothing of the fault")

    async def _reply_fault(self, connection: h11.Connection, client: Link,
                           status: int, code: str, reason: str, *, within: float,
                           subcode: str = "", extra: Sequence[tuple[str, str]] = (),
                           body_read: bool = False) -> bool:
        """A SOAP Fault of our own, in one write the client has `within` seconds to take
        (False when it did not); `body_read`: the request's body was read past h11 (which
        therefore still waits for it), so the connection may go on."""
        if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return True  # a response has started: nothing sensible can be added, the close says it
        body = soap.build_fault(code, reason, subcode=subcode, node=f"medgate/{self.vip.name}")
        headers = [("Content-Type", soap.SOAP_CONTENT_TYPE), ("Content-Length", str(len(body))),
                   *extra]
        if connection.their_state is not h11.DONE and not body_read:
            headers.append(("Connection", "close"))  # its body was not read: no keep-alive
        data = http.whole_response(connection, status, _phrase(status), headers, body)
        try:
            return await http.send_within(client, data, within)
        except http.PeerGone:
            return True  # gone: nothing to wait for

    # -- the member's side

    async def _forward(self, member: Member, exchange: _Exchange, replayable: bool) -> _Upstream:
        """Send the request to `member`; returns once its response head has arrived."""
        upstream = await self._upstream(member, exchange.peer)
        sent_anything = False
        try:
            sent_anything = True
            # Gathered and sent in few writes: a small request (ITI-18) is one.
            to_member, out = upstream.connection.send, _Gathered()
            out += self._request_head(member, exchange, to_member)
            for piece in exchange.prefix or ():
                out += to_member(h11.Data(data=piece))
            while (chunk := await self._client_body(exchange)) is not None:
                out += to_member(h11.Data(data=chunk))
                splice = bool(exchange.raw_left) and _splice_between(exchange, upstream)
                if out.full or splice:
                    await self._to_member(upstream, out)
                if splice:  # h11 does not see the rest: the connection is not pooled again
                    await self._splice_body(exchange, upstream)
                    break
            else:
                out += to_member(h11.EndOfMessage())
            await self._to_member(upstream, out)
            deadline = self._clock() + self.vip.ack_timeout
            while True:
                try:
                    event = await http.next_event(upstream.stream, upstream.connection,
                                                  deadline=deadline, answer=True,
                                                  deadlines=self.deadlines)
                except trio.TooSlowError:
                    raise http.PeerGone(f"no response within {self.vip.ack_timeout:g}s") \
                        from None
                if isinstance(event, h11.Response):
                    upstream.head = event
                    return upstream
                if not isinstance(event, h11.InformationalResponse):
                    raise http.PeerGone("connection closed before an HTTP response")
        except h11.LocalProtocolError as exc:
            # The gateway's own HTTP client refused what the client's request holds: the
            # client's fault, told to it (400); no member is blamed or tried.
            upstream.stream.close()
            raise soap.SoapError(f"the request cannot be forwarded: {http.reason_of(exc)}") \
                from None
        except (http.PeerGone, h11.ProtocolError) as exc:
            upstream.stream.close()
            why = http.peer_failure(exc)
            if replayable or not sent_anything:
                raise MemberFailed(why) from None
            strike(self.pool, member, why)
            name = soap.transaction_name(exchange.action)
            raise _RequestLost(f"{member.name} failed during an {name} ({why}); it may or may "
                               "not have been applied") from None
        except BaseException:
            upstream.stream.close()
            raise

    def _request_head(self, member: Member, exchange: _Exchange, to_member) -> bytes:
        """The request's head as `member` gets it, written by its connection's h11
        (`to_member`): the client's headers less hop-by-hop ones and those the gateway sets,
        X-Forwarded-For (and X-Forwarded-Client-Cert) of its own."""
        request, fields = exchange.request, exchange.fields
        forwarded = http.forwarded_for(fields, exchange.peer.host, self.vip.trusted_proxies)
        headers = [(k, v) for k, v in http.end_to_end(fields)
                   if k not in (b"x-forwarded-for", b"x-forwarded-client-cert")]
        certified = self.vip.forward_client_cert and exchange.peer.subject
        if len(headers) == len(fields) and request.http_version == b"1.1" and not certified:
            # Nothing to drop (the usual case): the request as h11 read it, whose headers it
            # checked then and does not check again as it would a new list (about 16 Python
            # calls a header), and the gateway's line before the blank line that ends it.
            # X-Forwarded-For holds addresses only (forwarded_for): nothing h11 would refuse.
            head = to_member(request)
            return b"%sX-Forwarded-For: %s\r\n\r\n" % (head[:-2], forwarded)
        headers.append((b"X-Forwarded-For", forwarded))
        if certified:
            headers.append((b"X-Forwarded-Client-Cert",
                            http.client_cert_header(exchange.peer.subject, exchange.peer.names)))
        if not any(name == b"host" for name, _ in fields):
            # An HTTP/1.0 request may come without Host (RFC 9112 §3.2 asks it of 1.1
            # only); towards the member the gateway speaks 1.1: it names the member.
            headers.insert(0, (b"Host", str(self.members[member.name].address).encode()))
        return to_member(h11.Request(method=request.method, target=request.target,
                                     headers=headers))

    async def _splice_body(self, exchange: _Exchange, upstream: _Upstream) -> None:
        """The rest of a body read past h11, moved from the client's socket to the member's
        by splice(2), never through this process's memory."""
        left = exchange.raw_left
        assert left is not None
        try:
            await splice_exactly(exchange.client, upstream.stream, left,
                                 read_timeout=self.vip.client_timeout,
                                 write_timeout=self.vip.ack_timeout)
        except SpliceBroken as exc:
            exchange.bytes_in += exc.moved
            if exc.side == "target":
                raise http.PeerGone(f"took no request bytes for {self.vip.ack_timeout:g}s"
                                    if exc.slow else exc.detail) from None
            if exc.slow:
                raise self._client_slow("sent nothing of its request") from None
            raise _ClientError(f"the client's connection ended in the middle of its request: "
                               f"{exc.detail}") from None
        exchange.bytes_in += left
        exchange.raw_left, exchange.body_done = 0, True

    async def _to_member(self, upstream: _Upstream, out: _Gathered) -> None:
        """Send what `out` gathered (and empty it)."""
        # A member that takes no bytes for ack_timeout has hung: it must not hold the client.
        if not await http.send_within(upstream.stream, out.take(), self.vip.ack_timeout):
            raise http.PeerGone(f"took no request bytes for {self.vip.ack_timeout:g}s")

    async def _upstream(self, member: Member, peer: Peer | None) -> _Upstream:
        origin = self._origin(member, peer)
        upstream = self._take_idle(member, origin, self._clock())
        if upstream is not None:
            return upstream
        stream = await self.open_member(member.name, peer)
        return _Upstream(stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=http.MAX_HEAD),
                         origin=origin)

    def _release(self, member: Member, upstream: _Upstream, keep: bool) -> None:
        """Pool the connection only when its state is known to be clean (see `_clean`)."""
        connection = upstream.connection
        # Stray bytes already read (h11's trailing data) are judged now; the socket itself is
        # looked at when the connection is taken again (_upstream), the later, stronger check.
        if (keep and connection.our_state is h11.DONE and connection.their_state is h11.DONE
                and (not connection.trailing_data[0] or self._clean(member, upstream))):
            connection.start_next_cycle()
            self.idle.put(member.name, upstream, self._clock())
        else:
            upstream.stream.close()

    def _clean(self, member: Member, upstream: _Upstream) -> bool:
        """Nothing arrived after the last response (see PooledVipHandler._reusable)."""
        return self._reusable(member, upstream.stream,
                              len(upstream.connection.trailing_data[0]), "a complete response")

    async def _relay_response(self, exchange: _Exchange, member: Member,
                              upstream: _Upstream) -> bool:
        """Stream the member's response to the client; True when both sides stay reusable."""
        head = upstream.head
        assert head is not None  # read by _exchange before the response is relayed
        exchange.status = head.status_code
        head_fields = http.header_list(head.headers)
        headers = http.end_to_end(head_fields)
        reason = head.reason or _phrase(head.status_code).encode()
        # Gathered and sent when the member's next bytes must be waited for, at FLUSH_AT, and
        # at the end: a small response (ITI-18's) is one write.
        to_client, out = exchange.connection.send, _Gathered()
        out += to_client(h11.Response(
            status_code=head.status_code, reason=reason,
            # nothing dropped: h11's own headers, checked as they were read, not again
            headers=head.headers if len(headers) == len(head_fields) else headers))
        length = _response_length(exchange.request, head.status_code, head_fields)
        if length is not None and length >= RAW_BODY_AT and _splice_between(exchange, upstream):
            exchange.kept = None  # not seen here: nothing to compare a shadow's with
            await self._splice_response(exchange, member, upstream, out, length)
            return False  # h11 did not see the body: the member connection is not pooled
        while True:
            try:
                event = upstream.connection.next_event()
            except h11.ProtocolError as exc:
                raise self._broke_off(member, exc) from None
            if event is h11.NEED_DATA:
                await self._to_client(exchange, out)
                try:
                    event = await http.next_event(upstream.stream, upstream.connection,
                                                  timeout=self.vip.server_timeout,
                                                  deadlines=self.deadlines)
                except (http.PeerGone, h11.ProtocolError) as exc:
                    raise self._broke_off(member, exc) from None
                except trio.TooSlowError:
                    raise self._broke_off(
                        member, f"sent nothing for {self.vip.server_timeout:g}s") from None
            if isinstance(event, h11.Data):
                exchange.bytes_out += len(event.data)
                out += to_client(h11.Data(data=event.data))
                if exchange.kept is not None:  # for the shadows, while it is small
                    exchange.kept += event.data
                    if len(exchange.kept) > RESPONSE_KEPT:
                        exchange.kept = None
                if out.full:
                    await self._to_client(exchange, out)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                out += to_client(h11.EndOfMessage())
                await self._to_client(exchange, out)
                return isinstance(event, h11.EndOfMessage)

    async def _splice_response(self, exchange: _Exchange, member: Member,
                               upstream: _Upstream, out: _Gathered, length: int) -> None:
        """A large response body (ITI-43's documents, RAD-69's images): what h11 already holds
        goes with the head, the rest socket to socket by splice(2)."""
        taken = 0
        while True:
            try:
                event = upstream.connection.next_event()
            except h11.ProtocolError as exc:
                raise self._broke_off(member, exc) from None
            if not isinstance(event, h11.Data):
                break  # NEED_DATA (the usual case) or, for a body all buffered, its end
            taken += len(event.data)
            out += exchange.connection.send(h11.Data(data=event.data))
        await self._to_client(exchange, out)
        try:
            await splice_exactly(upstream.stream, exchange.client, length - taken,
                                 read_timeout=self.vip.server_timeout,
                                 write_timeout=self.vip.client_timeout)
        except SpliceBroken as exc:
            exchange.bytes_out += taken + exc.moved
            if exc.side == "source":
                raise self._broke_off(member, exc.detail) from None
            if exc.slow:
                raise self._client_slow("read nothing of the response") from None
            raise _ClientError(f"the client's connection ended during the response: "
                               f"{exc.detail}") from None
        exchange.bytes_out += length
        exchange.response_spliced = True

    def _broke_off(self, member: Member, failure: Exception | str) -> _ClientError:
        why = http.peer_failure(failure)
        strike(self.pool, member, f"broke off its response: {why}")
        return _ClientError(f"{member.name} broke off its response: {why}")

    def _client_slow(self, what: str) -> _ClientError:
        """The client stalled in the middle of an exchange (not idle between two)."""
        return _ClientError(f"the client {what} for {self.vip.client_timeout:g}s")

    async def _to_client(self, exchange: _Exchange, out: _Gathered) -> None:
        """Send what `out` gathered (and empty it); _ClientError for a client that stops
        reading for client_timeout."""
        data = out.take()
        if data and not await http.send_within(exchange.client, data, self.vip.client_timeout):
            raise self._client_slow("read nothing of the response")


class _Gathered(bytearray):
    """What h11 gave for one peer, kept to be sent in few writes (added with +=, which costs
    no Python call: an ITI-18 adds six times); `full` at FLUSH_AT bytes."""

    @property
    def full(self) -> bool:
        return len(self) >= FLUSH_AT

    def take(self) -> bytes:
        data = bytes(self)  # a copy: what a link holds on to must not change under it
        del self[:]
        return data


def _splice_between(exchange: _Exchange, upstream: _Upstream) -> bool:
    """Whether a body can go between the client and the member by splice(2): plain sockets
    both ways."""
    return exchange.client.splice_fd() is not None and upstream.stream.splice_fd() is not None


def _done_past_h11(exchange: _Exchange) -> bool:
    """The exchange ended whole with a body (request, response or both) past h11, and the
    client keeps the connection: its h11 state machine is behind and starts afresh."""
    connection = exchange.connection
    request_done = connection.their_state is h11.DONE or exchange.raw_left == 0
    response_done = connection.our_state is h11.DONE or exchange.response_spliced
    past = exchange.raw_left == 0 or exchange.response_spliced
    return past and request_done and response_done and _keeps_alive(exchange)


def _keeps_alive(exchange: _Exchange) -> bool:
    """HTTP/1.1 without "Connection: close" (h11's own rule for a response it finishes)."""
    return exchange.request.http_version == b"1.1" and not any(
        name == b"connection" and any(token.strip() == b"close"
                                      for token in value.lower().split(b","))
        for name, value in exchange.fields)


def _response_length(request: h11.Request, status: int,
                     fields: list[tuple[bytes, bytes]]) -> int | None:
    """A response body's declared length (`fields`: its headers), where it has one (not
    HEAD, 204 or 304)."""
    if request.method == b"HEAD" or status in (204, 304):
        return None
    return _declared_length(fields)


def _declared_length(fields: list[tuple[bytes, bytes]]) -> int | None:
    """Content-Length, when the body is framed by it (h11 has checked it is a number and
    that Transfer-Encoding is not also given); `fields` as h11 gives them (names lower-case)."""
    length = None
    for name, value in fields:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            length = int(value)
    return length


_PHRASES = {status.value: status.phrase for status in HTTPStatus}


def _phrase(status: int) -> str:
    return _PHRASES.get(status, "")
