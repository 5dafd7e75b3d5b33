"""The streams the router admits jobs from: the shared jobs stream and every tenant's own, read through one
size-bounded, fair reader (common/streams.SubmissionReader)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from common.streams import SubmissionReader


@dataclass
class Source:
    """A stream the router admits jobs from: the shared jobs stream (``tenant`` None) or a tenant's own."""

    stream: str
    tenant: str | None = None
    epoch: int = 0

    @property
    def share_key(self) -> str:
        """Whose fair share its jobs count against (common/admission.FairShare)."""
        return self.tenant or ""


class Sources:
    """The sources in force and their reader. ``lock`` is held while a batch is admitted and while the set
    changes, so no batch sees half a change."""

    def __init__(self, reader: SubmissionReader, jobs_stream: str):
        self.reader, self.jobs_stream = reader, jobs_stream
        self.by_stream: dict[str, Source] = {jobs_stream: Source(jobs_stream)}
        self.lock = asyncio.Lock()
        reader.set_streams([jobs_stream])

    def get(self, stream: str) -> Source | None:
        return self.by_stream.get(stream)

    def tenants(self) -> list[Source]:
        return [s for s in self.by_stream.values() if s.tenant is not None]

    async def set_tenants(self, ready: dict[str, Source]) -> None:
        """Serve exactly these tenant streams (and the shared one) from the next read on."""
        async with self.lock:
            self.by_stream = {self.jobs_stream: self.by_stream[self.jobs_stream], **ready}
            self.reader.set_streams(list(self.by_stream))
