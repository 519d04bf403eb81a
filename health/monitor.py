"""Runs each member's check on its interval and feeds the results to the balancer.

Resource handling: one task per member, all in the monitor's nursery; each check is bounded by
its timeout, so a hung member costs one task waiting, never a stuck monitor.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import trio

from gateway.balancer import Balancer, Health, Pool, Transition
from gateway.config import MemberConfig, VipConfig
from health.checks import check_target, run_check

log = logging.getLogger("medgate.health")

JITTER = 0.1  # +-10% of the interval, so checks of many members do not fire in lockstep


class Monitor:
    """Health checks for every member of the given VIPs."""

    def __init__(self, balancer: Balancer, vips: list[VipConfig] | tuple[VipConfig, ...],
                 checked: Callable[[], None] | None = None) -> None:
        self.balancer = balancer
        self.vips = list(vips)
        self.checked = checked  # told after each check is recorded (a leader's workers follow)
        # Built once per monitor (a reload makes a new one): TLS contexts read their files here.
        self.targets = {(vip.name, member.name): check_target(member, vip.health)
                        for vip in self.vips for member in vip.members}
        self.cancel_scope = trio.CancelScope()  # cancel to stop this monitor (reload replaces it)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Check every member once, report `started`, then keep checking until cancelled."""
        with self.cancel_scope:
            async with trio.open_nursery() as first_round:
                for vip in self.vips:
                    for member in vip.members:
                        first_round.start_soon(self.check_once, vip, member)
            task_status.started()
            async with trio.open_nursery() as nursery:
                for vip in self.vips:
                    for member in vip.members:
                        nursery.start_soon(self._loop, vip, member)

    @staticmethod
    def _say_when_it_fails_back(vip: VipConfig, member: MemberConfig, pool: Pool) -> None:
        """A member is up again while a later one takes the new clients (failover mode)."""
        if pool.failback_manual:
            log.warning("vip=%s member=%s is up; %s keeps the new clients until an operator "
                        "fails back (failback = \"manual\": gateway ctl failback %s)", vip.name,
                        member.name, pool.active, vip.name)
            return
        now = trio.current_time()
        at = pool.failback_at(now)
        if at is not None and at > now:
            wall = time.strftime("%H:%M:%S", time.localtime(time.time() + at - now))
            log.warning("vip=%s member=%s is up; %s keeps the new clients until %s "
                        "(failback_after %gs); calling AEs within their study window stay "
                        "where they are", vip.name, member.name, pool.active, wall,
                        pool.failback_after)

    async def _loop(self, vip: VipConfig, member: MemberConfig) -> None:
        while True:
            await trio.sleep(vip.health.interval * random.uniform(1 - JITTER, 1 + JITTER))
            if self.probe_needed(vip, member, trio.current_time()):
                await self.check_once(vip, member)

    def probe_needed(self, vip: VipConfig, member: MemberConfig, now: float) -> bool:
        """False for an hl7-ack member that ACKed live traffic within the last interval
        (skip_when_live): a heartbeat message would only add traffic to a busy link."""
        health = vip.health
        return not (health.check == "hl7-ack" and health.skip_when_live
                    and self.balancer.pool(vip.name).proven_alive(member.name, now,
                                                                  health.interval))

    async def check_once(self, vip: VipConfig, member: MemberConfig) -> Transition | None:
        """Run one check, record it, and log a health change."""
        target = self.targets[vip.name, member.name]
        outcome = await run_check(target, vip.health)
        pool = self.balancer.pool(vip.name)
        transition = pool.record_check(member.name, outcome.ok, outcome.detail, outcome.latency,
                                       trio.current_time(), outcome.certificate_expires)
        if self.checked is not None:
            self.checked()
        if transition is not None:
            level = logging.INFO if outcome.ok else logging.WARNING
            log.log(level, "vip=%s member=%s health %s -> %s: %s check %s: %s", vip.name,
                    member.name, transition.old.value, transition.new.value, vip.health.check,
                    target.address, outcome.detail)
            if transition.new is Health.UP and pool.standby_active():
                self._say_when_it_fails_back(vip, member, pool)
        else:
            log.debug("vip=%s member=%s %s check %s: %s (%.1f ms)", vip.name, member.name,
                      vip.health.check, "passed" if outcome.ok else "failed", outcome.detail,
                      outcome.latency * 1000)
        return transition
