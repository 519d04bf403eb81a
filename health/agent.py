"""HAProxy agent-check responder: medgate's negotiate checks and admin state, in HAProxy's words.

HAProxy connects, may send its `agent-send` text, and reads one line (HAProxy
configuration manual, "agent-check"). The member is named by that text ("vip/member") or by the port HAProxy asks on: the base
port + 1 + the member's index in the config (VIPs, then members, in file order). The reply
always carries the weight, because a weight set by the agent sticks until the agent changes it.
"""

from __future__ import annotations

import logging

import trio

from gateway.balancer import AdminState, Balancer, Health
from gateway.config import Address, VipConfig

log = logging.getLogger("medgate.agent")

READ_TIMEOUT = 0.2  # HAProxy sends agent-send at once; without it, nothing comes


class Agent:
    """Answers agent checks from a balancer kept up to date by a Monitor."""

    def __init__(self, balancer: Balancer, vips: list[VipConfig] | tuple[VipConfig, ...]) -> None:
        self.balancer = balancer
        self.members = [(vip.name, member.name, member.weight)
                        for vip in vips for member in vip.members]
        self.configured = {(vip, name): weight for vip, name, weight in self.members}

    def reply(self, vip: str, name: str) -> str:
        """The agent line for one member, e.g. '100% ready up' or '100% ready down #reason'."""
        if (vip, name) not in self.configured:
            return f"down #medgate agent: no member {vip}/{name} in its config\n"
        member = self.balancer.pool(vip).member(name)
        configured = self.configured[(vip, name)]
        percent = round(100 * member.weight / configured) if configured else 0
        admin = {AdminState.READY: "ready", AdminState.DRAIN: "drain",
                 AdminState.MAINT: "maint"}[member.admin]
        if member.health is Health.UNKNOWN:
            # Not checked yet (the agent has just started): no health word, so HAProxy keeps
            # what its own check says. "down" here would take every member out of HAProxy at
            # each restart of the agent, until its first checks are done.
            return f"{percent}% {admin}\n"
        if member.health is Health.UP:
            health = "up"
        else:
            reason = member.last_check.detail if member.last_check else member.health_detail
            # "#" starts HAProxy's description, which runs to the end of the line; it must stand
            # apart: HAProxy 2.6 ignores the unknown word "down#reason" (seen here).
            health = "down #" + " ".join(reason.split()).replace("#", " ")[:200]
        return f"{percent}% {admin} {health}\n"

    async def open(self, listen: Address) -> list[trio.SocketListener]:
        """Listeners on `listen` (member named by agent-send) and on the ports after it (one
        per member, by index); OSError (port taken) with none left open."""
        listeners: list[trio.SocketListener] = []
        try:
            for offset in range(len(self.members) + 1):
                listeners += await trio.open_tcp_listeners(
                    listen.port + offset if listen.port else 0, host=listen.host)
        except OSError:
            for listener in listeners:
                await listener.aclose()
            raise
        return listeners

    async def serve(self, listen: Address, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Open the listeners (see `open`) and answer agent checks on them."""
        await self.serve_on(await self.open(listen), task_status=task_status)

    async def serve_on(self, listeners: list[trio.SocketListener], *,
                       task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for index, listener in enumerate(listeners):
                member = self.members[index - 1][:2] if index else None
                nursery.start_soon(trio.serve_listeners, self._handler(member), [listener])
            task_status.started([Address(*l.socket.getsockname()[:2]) for l in listeners])

    def _handler(self, member: tuple[str, str] | None):
        async def handle(stream: trio.SocketStream) -> None:
            said = b""
            with trio.move_on_after(READ_TIMEOUT):
                while b"\n" not in said and len(said) < 512:
                    try:
                        data = await stream.receive_some(512)
                    except trio.BrokenResourceError:
                        return
                    if not data:
                        break
                    said += data
            text = said.decode("latin-1").strip()
            if text:
                vip, _, name = text.partition("/")
                line = self.reply(vip.strip(), name.strip())
            elif member is not None:
                line = self.reply(*member)
            else:
                line = 'down #medgate agent: name the member with agent-send "vip/member\\n"\n'
            try:
                await stream.send_all(line.encode("latin-1", "replace"))
            except trio.BrokenResourceError:
                pass
            log.debug("agent asked %r -> %s", text or member, line.strip())

        return handle
