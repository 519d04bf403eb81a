"""Layer-4 VIP: pick a member per connection, connect (redispatching on failure), splice bytes.

Used for services medgate does not speak, such as the HTTPS image viewer on 443.
"""

from __future__ import annotations

import logging

import trio

from gateway.balancer import NoMemberAvailable
from gateway.net.link import Link
from gateway.net.limits import ClientSlot
from gateway.net.relay import Splice, SpliceEnd, Traffic, dispatch, strike
from gateway.vips import VipHandler

log = logging.getLogger("medgate.tcp")


class TcpVip(VipHandler):
    """Handles each accepted client connection of one `protocol = "tcp"` VIP."""

    async def handle(self, client: Link, slot: ClientSlot) -> None:
        """Serve one client connection from accept to close, and log what happened."""
        started = trio.current_time()
        client_name = slot.client
        key = slot.peer.host
        try:
            member, upstream = await dispatch(
                self.pool, key, lambda member: self.open_member(member.name, slot.peer))
        except NoMemberAvailable as exc:
            log.warning("vip=%s client=%s refused: %s", self.vip.name, client_name, exc.reason.value)
            client.close()
            return
        traffic = Traffic()
        splice = Splice(client, upstream,
                        min(self.vip.client_timeout, self.vip.server_timeout), traffic)
        try:
            end, detail = await splice.run()
        finally:
            self.pool.drop_conn(member, traffic.from_client, traffic.from_member)
            upstream.close()
        if end is SpliceEnd.MEMBER:
            strike(self.pool, member, detail)
        level = logging.DEBUG if end is SpliceEnd.CLOSED else logging.INFO  # summary counts it
        log.log(level, "vip=%s client=%s member=%s bytes_in=%d bytes_out=%d duration=%.3fs "
                "outcome=%s", self.vip.name, client_name, member.name, traffic.from_client,
                traffic.from_member, trio.current_time() - started, detail)

