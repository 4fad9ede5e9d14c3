"""Semantic Versioning 2.0.0: strict parsing, precedence ordering and bumping.

medens versions checkpoints with semver so that "which model is newer" and "is this a breaking change"
are answered by the version string alone; the rules are the spec's (https://semver.org), not ad hoc.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from medens.errors import RegistryError

#: The regular expression recommended by semver.org (no leading "v", no leading zeros).
SEMVER_RE = re.compile(
    r"^(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)\.(?P<patch>0|[1-9]\d*)"
    r"(?:-(?P<prerelease>(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+(?P<build>[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
#: The same grammar without anchors, for finding a version inside a file name.
SEMVER_PATTERN = SEMVER_RE.pattern[1:-1]
BUMPS = ("major", "minor", "patch")


@total_ordering
@dataclass(frozen=True, eq=False)
class SemVer:
    """A parsed version; `<`, `==` and `sorted` follow semver precedence (build metadata is ignored)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: object) -> SemVer:
        """Parse a strict semver string; anything else raises `RegistryError` saying why."""
        if isinstance(text, SemVer):
            return text
        s = str(text).strip() if text is not None else ""
        m = SEMVER_RE.match(s)
        if m is None:
            hint = ""
            if s[:1] in ("v", "V") and SEMVER_RE.match(s[1:]):
                hint = f" (drop the leading 'v': {s[1:]})"
            elif re.fullmatch(r"\d+(\.\d+)?", s):
                hint = " (semver needs all three parts: MAJOR.MINOR.PATCH)"
            raise RegistryError(
                f"{s!r} is not a semantic version (MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD], semver 2.0.0){hint}"
            )
        pre, build = m.group("prerelease"), m.group("build")
        return cls(
            int(m.group("major")),
            int(m.group("minor")),
            int(m.group("patch")),
            tuple(pre.split(".")) if pre else (),
            tuple(build.split(".")) if build else (),
        )

    def __str__(self) -> str:
        out = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            out += "-" + ".".join(self.prerelease)
        if self.build:
            out += "+" + ".".join(self.build)
        return out

    def _key(self) -> tuple:
        # A release sorts after its prereleases; numeric identifiers sort numerically and before
        # alphanumeric ones; a longer prerelease sorts after its prefix (semver 2.0.0, section 11).
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SemVer):
            return NotImplemented
        return self._key() == other._key()

    def __lt__(self, other: SemVer) -> bool:
        if not isinstance(other, SemVer):
            return NotImplemented
        return self._key() < other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def bump(self, part: str) -> SemVer:
        """The next version after this one for a `major`, `minor` or `patch` change.

        A prerelease is released by the bump that reaches it (npm's rule): `1.2.0-rc.1` bumped by
        `minor` or `patch` gives `1.2.0`, and `2.0.0-rc.1` bumped by `major` gives `2.0.0`.
        """
        if part not in BUMPS:
            raise RegistryError(f"bump must be one of {', '.join(BUMPS)}, got {part!r}")
        pre = bool(self.prerelease)
        if part == "major":
            if pre and self.minor == 0 and self.patch == 0:
                return SemVer(self.major, 0, 0)
            return SemVer(self.major + 1, 0, 0)
        if part == "minor":
            if pre and self.patch == 0:
                return SemVer(self.major, self.minor, 0)
            return SemVer(self.major, self.minor + 1, 0)
        return SemVer(self.major, self.minor, self.patch if pre else self.patch + 1)


#: What a model with no version yet is bumped from: its first version is 1.0.0 (major), 0.1.0 (minor)
#: or 0.0.1 (patch).
NO_VERSION = SemVer(0, 0, 0)


def parse_version(text: object) -> SemVer:
    """`SemVer.parse` as a function."""
    return SemVer.parse(text)
