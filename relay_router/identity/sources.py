"""Building the resolver and the ADT listener from router.toml [identity] (one place, for the service wiring).

runtime = IdentityRuntime(cfg.identity, state_dir=cfg.router.state_dir, audit=service.audit)
await runtime.start()        # opens the table, starts the ADT feed when adt_listen is set
lookup = await runtime.resolver.lookup(ref, target)
await runtime.stop()
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from relay_common.config import parse_host_port
from relay_router.identity.resolver import Resolver, Source
from relay_router.identity.xref import DEFAULT_FILE, XrefSource, XrefTable

if TYPE_CHECKING:
    from relay_common.audit import AuditLog
    from relay_router.identity.adt import AdtListener
    from relay_router.identity.config import IdentitySection, SourceSection

log = logging.getLogger("relay_router.identity")


def table_path(section: IdentitySection, state_dir: Path) -> Path:
    """The cross-reference database: the first table source's `path`, else STATE_DIR/identity.sqlite."""
    for source in section.source:
        if source.kind == "table" and source.path is not None:
            return source.path
    return state_dir / DEFAULT_FILE


def build_source(settings: SourceSection, section: IdentitySection, table: XrefTable | None) -> Source:
    if settings.kind == "table":
        assert table is not None
        return XrefSource(table, name=settings.label, timeout_s=settings.timeout_s)
    if settings.kind == "pixm":
        from relay_router.identity.pixm import PixmSource

        return PixmSource(
            settings, section.domain_of, demographics_for=section.issuer if section.take_demographics else ""
        )
    if settings.kind == "pix":
        from relay_router.identity.pix import PixSource

        return PixSource(settings, section.domain_of)
    from relay_router.identity.other_ids import OtherIdsSource

    return OtherIdsSource(name=settings.label, timeout_s=settings.timeout_s)


class IdentityRuntime:
    """The resolver, the cross-reference table and the ADT listener of one router."""

    def __init__(self, section: IdentitySection, *, state_dir: Path, audit: AuditLog | None = None) -> None:
        self.section = section
        self.audit = audit
        needs_table = section.adt_listen or any(s.kind == "table" for s in section.source)
        self.table = XrefTable(table_path(section, state_dir)) if needs_table else None
        self.resolver = Resolver(
            [build_source(s, section, self.table) for s in section.source],
            audit=audit,
            cache_ttl_s=section.cache_ttl_s,
            cache_entries=section.cache_entries,
        )
        self.adt: AdtListener | None = None

    async def start(self) -> None:
        if not self.section.adt_listen:
            return
        from relay_router.identity.adt import AdtListener, AdtProcessor

        assert self.table is not None
        host, port = parse_host_port(self.section.adt_listen)
        processor = AdtProcessor(
            self.table, self.section.domain_of(self.section.issuer), resolver=self.resolver, audit=self.audit
        )
        self.adt = AdtListener(processor, host=host, port=port, allow=self.section.adt_allow, tls=self._adt_tls())
        await self.adt.start()

    async def stop(self) -> None:
        if self.adt is not None:
            await self.adt.stop()
        await self.resolver.aclose()
        if self.table is not None:
            self.table.close()

    def _adt_tls(self) -> ssl.SSLContext | None:
        s = self.section
        if s.adt_cert_file is None or s.adt_key_file is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(s.adt_cert_file), str(s.adt_key_file))
        return context
