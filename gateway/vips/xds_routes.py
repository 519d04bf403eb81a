"""Where each SOAP action goes on an XDS VIP: the role that serves it, the members of that role,
whether it may be sent again to another member, and the identifier that picks among them.

The transactions the gateway knows are `protocols.soap.TRANSACTIONS`; a VIP's `actions` table
adds actions or sends known ones to another role, and `default_role` takes every other action.
An action added by `actions` or sent by `default_role` is a write: the gateway cannot know it
changes nothing, so it is never sent to a second member once its bytes went to one.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import MemberConfig, Role, VipConfig
from protocols import soap

# The member key a transaction's identifiers are matched against, and their name in requests.
_ID_KEYS = {soap.RouteBy.REPOSITORY: ("repository_unique_id", "RepositoryUniqueId"),
            soap.RouteBy.COMMUNITY: ("home_community_id", "homeCommunityId")}


@dataclass(frozen=True)
class XdsRoute:
    role: Role | None  # None: an action with no route (only role "both" members take it)
    query: bool  # may be sent to the next member after one failed before answering
    route_by: soap.RouteBy
    members: tuple[str, ...]  # the VIP's members that serve `role`, in config order

    def describe(self) -> str:
        return str(self.role) if self.role else "XDS"

    def member_id(self, member: MemberConfig) -> str:
        """The identifier of `member` that this route's requests name ("" = none set)."""
        key = _ID_KEYS.get(self.route_by)
        return getattr(member, key[0]) if key else ""

    def id_name(self) -> str:
        key = _ID_KEYS.get(self.route_by)
        return key[1] if key else ""


class XdsRoutes:
    """The routes of one VIP's config."""

    def __init__(self, vip: VipConfig) -> None:
        self._vip = vip
        overrides = dict(vip.actions)
        self._routes = {action: self._route(overrides.get(action, Role(known.role)), known.query,
                                            known.route_by)
                        for action, known in soap.TRANSACTIONS.items()}
        for action, role in vip.actions:
            if action not in soap.TRANSACTIONS:
                self._routes[action] = self._route(role, False, soap.RouteBy.ANY)
        self._others = self._route(vip.default_role, False, soap.RouteBy.ANY)

    def _route(self, role: Role | None, query: bool, route_by: soap.RouteBy) -> XdsRoute:
        members = tuple(m.name for m in self._vip.members if m.role.serves(role))
        return XdsRoute(role, query, route_by, members)

    def route(self, action: str) -> XdsRoute:
        return self._routes.get(action) or self._others
