"""Retention without silent deletion: old records move, whole segments at a time, into archive
files that carry their own signed checkpoint, and the live log keeps a record of each move."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from signer._internal.audit._chain import Checkpoint, Event, Record, iso, refs_of, refs_text
from signer._internal.audit._store import Archived, AuditStore
from signer._internal.files import private_file


def archive(store: AuditStore, directory: Path, before: datetime) -> Archived | None:
    """Moves the records up to the newest signed checkpoint older than ``before`` into a file in
    ``directory``; returns the segment, or None when no such checkpoint is newer than the last
    archive. The file is written and synced before anything leaves the live log."""
    checkpoints = store.checkpoints()
    if not checkpoints:
        return None
    # Checkpoints whose record is still live (the anchor of an earlier archive is not).
    times = {r.seq: r.event.time for r in store.records(upto=checkpoints[-1].seq)}
    due = [c for c in checkpoints if c.seq in times and times[c.seq] < before]
    if not due:
        return None
    upto = due[-1].seq
    records = list(store.records(upto=upto))
    first = records[0]
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A database's chains (replicas) archive into one directory, each under its own name.
    chain = f"{store.chain}-" if store.chain else ""
    path = directory / f"audit-{chain}{first.seq:012d}-{upto:012d}.jsonl"
    tmp = path.with_suffix(".tmp")
    digest = hashlib.sha256()
    with open(private_file(tmp), "wb") as fh:
        covering = [c for c in checkpoints if first.seq <= c.seq <= upto]
        for line in _lines(first.prev_hash, records, covering, store.chain):
            data = json.dumps(line, separators=(",", ":"), sort_keys=True).encode() + b"\n"
            digest.update(data)
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    segment = Archived(first.seq, upto, records[-1].hash, path.name, digest.hexdigest())
    store.archived(segment)
    return segment


def _lines(
    prev_hash: str, records: list[Record], checkpoints: list[Checkpoint], chain: str = ""
) -> Iterator[dict[str, Any]]:
    segment: dict[str, Any] = {
        "first": records[0].seq,
        "last": records[-1].seq,
        "prev_hash": prev_hash,
    }
    if chain:  # a database's chain (replicas); its checkpoints are signed as that chain's
        segment["chain"] = chain
    yield {"segment": segment}
    for r in records:
        e = r.event
        yield {
            "record": [
                r.seq,
                iso(e.time),
                e.caller,
                e.operation,
                e.key,
                e.version,
                e.payload_sha256,
                e.status,
                r.prev_hash,
                r.hash,
            ]
        }
    for c in checkpoints:
        line: list[Any] = [c.seq, c.hash, c.time, base64.b64encode(c.signature).decode()]
        if c.prev is not None:
            line.append(c.prev)
        if c.refs:
            line.append(refs_text(c.refs))
        yield {"checkpoint": line}


def read_archive(path: Path) -> tuple[dict[str, Any], list[Record], list[Checkpoint]]:
    """The header, records and checkpoints of an archive file; its checkpoints are of the
    chain its header names ("": an archive of a log's one chain, or one from before archives
    named their chain)."""
    header: dict[str, Any] = {}
    records: list[Record] = []
    checkpoints: list[Checkpoint] = []
    with open(path, "rb") as fh:
        for line in fh:
            item = json.loads(line)
            if "segment" in item:
                header = item["segment"]
            elif "record" in item:
                seq, at, *fields, prev, h = item["record"]
                records.append(Record(seq, Event(datetime.fromisoformat(at), *fields), prev, h))
            elif "checkpoint" in item:
                seq, h, at, sig, *more = item["checkpoint"]
                prev = more[0] if more else None
                refs = refs_of(more[1]) if len(more) > 1 else ()
                checkpoints.append(Checkpoint(seq, h, at, base64.b64decode(sig), prev, refs))
    chain = str(header.get("chain", ""))
    return header, records, [replace(c, chain=chain) for c in checkpoints]
