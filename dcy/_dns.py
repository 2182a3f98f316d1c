"""Consul's DNS interface through dnspython: how a program that only speaks DNS finds
``worker.service.sd``.

Queries go straight to the agent's DNS port (learned from ``/v1/agent/self``), over TCP:
Consul caps UDP answers at three records (``dns_config.udp_answer_limit``), and a resolver
that silently drops instances would disagree with the HTTP path.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from dcy._errors import ConsulUnavailable, NoHealthyInstances, ServiceNotFound
from dcy._query import PASSING_ONLY, ServiceQuery


@dataclass(frozen=True, slots=True)
class DnsTarget:
    """One SRV answer: the node's DNS name, its address and the service port."""

    target: str
    address: str
    port: int
    priority: int = 1
    weight: int = 1


class DnsResolver:
    """A resolver pointed at one Consul agent's DNS port."""

    def __init__(
        self, address: str, port: int, *, domain: str = "sd", timeout: float = 2.0
    ) -> None:
        self.address = address
        self.port = port
        self.domain = domain.strip(".")
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [address]
        resolver.port = port
        resolver.timeout = timeout
        resolver.lifetime = timeout
        resolver.cache = None
        self._resolver = resolver

    def name_for(self, name: str | ServiceQuery) -> str:
        """The DNS name of any query form: ``v2.worker@dc2`` → ``v2.worker.service.dc2.sd``.

        Consul's DNS interface cannot select health states: it answers with the instances
        its ``dns_config.only_passing`` setting allows. A query naming states (``|any``,
        ``|passing,warning``) raises ValueError rather than being answered for other states
        than it asks for; use ``Dcy.instances`` for those."""
        query = (
            name if isinstance(name, ServiceQuery) else ServiceQuery.parse(name, domain=self.domain)
        )
        if query.states != PASSING_ONLY:
            raise ValueError(
                f"{str(query)!r}: Consul DNS cannot select health states (it answers as the "
                "agent's dns_config.only_passing says); drop the '|states' part or use "
                "Dcy.instances()"
            )
        labels = [query.tag, query.name, "service", query.datacenter, self.domain]
        return ".".join(label for label in labels if label) + "."

    async def srv(self, name: str | ServiceQuery) -> tuple[DnsTarget, ...]:
        """SRV records of a service, with the addresses Consul put in the additional section."""
        qname = self.name_for(name)
        answer = await self._resolve(qname, dns.rdatatype.SRV, name)
        addresses: dict[str, str] = {}
        for rrset in answer.response.additional:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                for rdata in rrset:
                    addresses.setdefault(rrset.name.to_text(), rdata.to_text())
        targets = []
        for rdata in answer:
            target = rdata.target.to_text()
            address = addresses.get(target) or (await self._addresses(target, name))[0]
            targets.append(DnsTarget(target, address, rdata.port, rdata.priority, rdata.weight))
        return tuple(sorted(targets, key=lambda t: (t.address, t.port)))

    async def addresses(self, name: str | ServiceQuery) -> tuple[str, ...]:
        """A records of a service: the address of every healthy instance."""
        return await self._addresses(self.name_for(name), name)

    async def _addresses(self, qname: str, name: str | ServiceQuery) -> tuple[str, ...]:
        answer = await self._resolve(qname, dns.rdatatype.A, name)
        return tuple(sorted({rdata.to_text() for rdata in answer}))

    async def _resolve(
        self, qname: str, rdtype: dns.rdatatype.RdataType, name: str | ServiceQuery
    ) -> dns.resolver.Answer:
        try:
            return await self._resolver.resolve(qname, rdtype, tcp=True, search=False)
        except dns.resolver.NXDOMAIN as exc:
            raise ServiceNotFound(f"{qname} does not exist in Consul DNS", query=str(name)) from exc
        except dns.resolver.NoAnswer as exc:
            raise NoHealthyInstances(
                f"{qname} has no healthy instance in Consul DNS", query=str(name)
            ) from exc
        except (dns.exception.Timeout, dns.resolver.NoNameservers, OSError) as exc:
            raise ConsulUnavailable(
                f"Consul DNS at {self.address}:{self.port} did not answer for {qname}: {exc}",
                address=f"{self.address}:{self.port}",
            ) from exc
