"""Which cache a run was trained on, as every checkpoint's model card records it (``card.cache``):
the hash of the cache's base fingerprint (dataset listing, resolution, views, seed) and, for each
group the run read, the hash of its fingerprint and of its model's weights. A resume, ``repa align``
and a GMem bank compare a cache they are given with this record."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from repa_cache.cache.errors import CacheError
from repa_cache.cache.format import sha256_json
from repa_cache.cache.reader import ReaderBase


@dataclass(frozen=True)
class CacheIdentity:
    base_fingerprint: str | None = None  # None: a card written before it was recorded
    groups: Mapping[str, str] = field(default_factory=dict)  # group -> fingerprint hash
    weights: Mapping[str, str | None] = field(default_factory=dict)  # group -> sha256 of the model weights that wrote it

    @classmethod
    def of(cls, reader: ReaderBase) -> CacheIdentity:
        """The identity of the groups ``reader`` opened."""
        return cls(sha256_json(reader.meta.base_fingerprint),
                   {g: info.commit["fingerprint_hash"] for g, info in reader.groups.items()},
                   {g: info.commit.get("weights_sha256") for g, info in reader.groups.items()})

    def check(self, reader: ReaderBase, hint: str) -> None:
        """Refuse a reader with a group whose fingerprint differs from the recorded one (a group
        the record does not name is not compared); ``hint`` says what to do instead."""
        for group, info in reader.groups.items():
            if group in self.groups and self.groups[group] != info.commit["fingerprint_hash"]:
                raise CacheError(f"group '{group}' of {reader.root} is not the one the checkpoint was trained on "
                                 f"(fingerprints differ); {hint}")

    def to_json(self) -> dict[str, Any]:
        return {"base_fingerprint": self.base_fingerprint, "groups": dict(self.groups), "weights": dict(self.weights)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CacheIdentity:
        """The identity a card recorded (an empty or partial record: what it holds)."""
        return cls(d.get("base_fingerprint"), dict(d.get("groups") or {}), dict(d.get("weights") or {}))
