"""Every trust decision airpack makes, in one place that does no I/O.

Like python-tuf's trusted metadata set, this module is handed facts (a parsed
manifest, the signatures that verified, the clock, what the registry holds for
a channel) and decides; it never reads a file, a database or the network.
Callers supply the facts; nothing else in airpack compares sequences, expiry
times or signer counts. Ask "where is rollback protection decided?" and the
answer is ``check_sequence`` below.
"""

from __future__ import annotations

import datetime as dt
from collections import abc
from dataclasses import dataclass
from enum import Enum

from .errors import (
    ExpiredError,
    KeyNotValidError,
    PolicyError,
    PolicyReplayError,
    PolicyUpdateError,
    RollbackError,
    SequenceJumpError,
    SignatureError,
)

MAX_SEQUENCE_JUMP = 1_000_000  # a leaked key cannot jump a channel to the end of the sequence space
# The highest sequence a bundle may carry: 2^53 - 1, the largest integer every JSON reader holds exactly
# (RFC 7493, I-JSON; JavaScript's Number.MAX_SAFE_INTEGER), so an auditor's tool never sees two
# sequences as one. A bundle a second for 285 million years; pack refuses more (exit 2), verify exit 4.
MAX_SEQUENCE = 2**53 - 1


@dataclass(frozen=True)
class ChannelHigh:
    """What the registry holds for a channel: the highest installed sequence and the bundle that carried it."""

    sequence: int
    manifest_sha256: str
    bundle: str


class Sequence(Enum):
    """How a bundle's sequence stands against the channel's highest installed one."""

    NEW = "new"  # no bundle of the channel installed yet
    NEWER = "newer"  # above the highest, within the allowed jump
    SAME = "same"  # the very bundle installed last (same sequence, same manifest)
    CONFLICT = "conflict"  # the same sequence with other content: a rollback in disguise
    OLDER = "older"  # below the highest: a rollback
    JUMP = "jump"  # more than MAX_SEQUENCE_JUMP above the highest (above 0 for a channel's first bundle)


def classify_sequence(high: ChannelHigh | None, *, sequence: int, manifest_sha256: str) -> Sequence:
    """Where ``sequence`` stands on its channel; the single comparison every rollback rule uses.

    A channel with nothing installed counts as standing at 0, so its first
    bundle may not start beyond ``MAX_SEQUENCE_JUMP`` either: otherwise a
    leaked key's first bundle on a fresh host could sit at the top of the
    sequence space and leave the channel no room to be updated.
    """
    if high is None:
        return Sequence.JUMP if sequence > MAX_SEQUENCE_JUMP else Sequence.NEW
    if sequence > high.sequence + MAX_SEQUENCE_JUMP:
        return Sequence.JUMP
    if sequence > high.sequence:
        return Sequence.NEWER
    if sequence < high.sequence:
        return Sequence.OLDER
    return Sequence.SAME if manifest_sha256 == high.manifest_sha256 else Sequence.CONFLICT


def describe_sequence(verdict: Sequence, high: ChannelHigh | None, *, name: str, sequence: int, channel: str) -> str | None:
    """Why an install of this bundle would be refused (the text of the refusal), or None when it would not."""
    if high is None:
        if verdict is Sequence.JUMP:
            return (f"bundle {name} has sequence {sequence}, more than {MAX_SEQUENCE_JUMP:,}, and is the first of channel "
                    f"{channel} on this host: a channel's first bundle counts from 0")
        return None
    if verdict is Sequence.JUMP:
        return (f"bundle {name} has sequence {sequence}, more than {MAX_SEQUENCE_JUMP:,} beyond {high.sequence}, "
                f"the highest installed on channel {channel}")
    if verdict is Sequence.OLDER:
        return f"bundle {name} has sequence {sequence}, lower than {high.sequence} ({high.bundle}) already installed on channel {channel}"
    if verdict is Sequence.CONFLICT:
        return f"bundle {name} has sequence {sequence} of channel {channel}, already installed with other content ({high.bundle})"
    return None


def check_sequence(high: ChannelHigh | None, *, name: str, channel: str, sequence: int, manifest_sha256: str,
                   allow_downgrade: bool) -> bool:
    """Rollback protection per channel. Returns True when the install is a downgrade the operator allowed.

    A sequence below the channel's highest installed one, or equal to it with
    other content, is a rollback (exit 4) unless ``allow_downgrade``; a jump
    of more than ``MAX_SEQUENCE_JUMP`` is refused even then.
    """
    verdict = classify_sequence(high, sequence=sequence, manifest_sha256=manifest_sha256)
    why = describe_sequence(verdict, high, name=name, sequence=sequence, channel=channel)
    if verdict is Sequence.JUMP:
        first = f"a channel's first bundle may carry at most {MAX_SEQUENCE_JUMP:,}; " if high is None else ""
        raise SequenceJumpError(str(why), hint=f"Ask the packer why the sequence jumped; {first}a channel may grow by at most "
                                f"{MAX_SEQUENCE_JUMP:,} per install.")
    if verdict in (Sequence.OLDER, Sequence.CONFLICT):
        if not allow_downgrade:
            raise RollbackError(f"{why}: refusing a rollback")
        return True
    return False


def check_sequence_for_host(host_high: int | None, *, name: str, channel: str, sequence: int) -> None:
    """``pack --for``: refuse (exit 4), before anything is fetched, a sequence the profiled host would refuse.

    The host's highest installed sequence for the channel comes from its
    profile (information, not trust: the host decides again at install). A
    new bundle must be above it, and at most ``MAX_SEQUENCE_JUMP`` above it;
    a channel the profile lacks counts from 0, as ``classify_sequence`` says.
    The pack's manifest does not exist yet, so an equal sequence counts as a
    rollback too (the host would see other content at that sequence).
    """
    high = ChannelHigh(host_high, "", "") if host_high is not None else None
    verdict = classify_sequence(high, sequence=sequence, manifest_sha256="")
    if verdict is Sequence.JUMP:
        if host_high is None:
            raise SequenceJumpError(f"bundle {name} has sequence {sequence}, more than {MAX_SEQUENCE_JUMP:,}, and the host's "
                                    f"profile shows no bundle of channel {channel}: the host would refuse the jump "
                                    "(a channel's first bundle counts from 0)",
                                    hint=f"Choose a sequence between 1 and {MAX_SEQUENCE_JUMP}.")
        raise SequenceJumpError(f"bundle {name} has sequence {sequence}, more than {MAX_SEQUENCE_JUMP:,} above the host's "
                                f"{host_high} for channel {channel}: the host would refuse the jump",
                                hint=f"Choose a sequence between {host_high + 1} and {host_high + MAX_SEQUENCE_JUMP}.")
    if verdict in (Sequence.OLDER, Sequence.SAME, Sequence.CONFLICT):
        raise RollbackError(f"bundle {name} has sequence {sequence}, but the host's profile shows channel {channel} at sequence "
                            f"{host_high}: the host would refuse it as a rollback",
                            hint=f"Raise bundle.sequence in the spec above {host_high}.")


def check_sequence_range(*, name: str, sequence: int) -> None:
    """A signed sequence above ``MAX_SEQUENCE`` is refused (exit 4) on every host, whatever the registry holds."""
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise SequenceJumpError(f"bundle {name} has sequence {sequence}, above the highest airpack accepts ({MAX_SEQUENCE:,}, "
                                "2^53 - 1)", hint="airpack pack never writes such a sequence: ask the packer how this bundle "
                                "was made, and do not install it.")


def is_expired(expires: dt.datetime | None, now: dt.datetime | None = None) -> bool:
    """Expired from the very second of ``expires`` on; a bundle without one never expires."""
    return expires is not None and (now or dt.datetime.now(dt.UTC)) >= expires


def check_fresh(*, name: str, sequence: int, expires: dt.datetime | None, now: dt.datetime | None = None) -> None:
    """A bundle past its signed expiry is refused (exit 4), whatever else holds."""
    if expires is not None and is_expired(expires, now):
        raise ExpiredError(f"bundle {name} (sequence {sequence}) expired at {expires:%Y-%m-%dT%H:%M:%SZ}")


# -- keys and their state ---------------------------------------------------------------------


class KeyState(Enum):
    """Where a trust policy key stands at a moment: only a valid key's signature counts."""

    VALID = "valid"
    EXPIRED = "expired"  # past its ``expires``: kept in the policy, but its signatures no longer count
    REVOKED = "revoked"  # moved to the policy's ``revoked`` list: never counts again, and cannot be added back


def key_state(*, expires: dt.datetime | None, revoked: bool = False, now: dt.datetime | None = None) -> KeyState:
    """A key's state at ``now``: revoked wins over expired; expired from the very second of ``expires`` on."""
    if revoked:
        return KeyState.REVOKED
    if is_expired(expires, now):
        return KeyState.EXPIRED
    return KeyState.VALID


@dataclass(frozen=True)
class NotCounted:
    """A policy key that made a valid signature over the exact payload, but does not count: revoked or expired.

    ``detail`` is the revocation reason or the expiry time, so a refusal can say why the key no longer counts.
    """

    name: str
    keyid: str
    state: KeyState
    detail: str

    def describe(self) -> str:
        why = f"revoked: {self.detail}" if self.state is KeyState.REVOKED else f"expired at {self.detail}"
        return f"{self.name} ({self.keyid[:12]}) is {why}"


def check_policy_usable(*, threshold: int, keys: int, source: str, expired: abc.Sequence[str] = (),
                        revoked: abc.Sequence[str] = ()) -> None:
    """A policy with fewer valid keys than its threshold can never be met: a configuration error (exit 2).

    ``keys`` counts the valid keys only; ``expired`` and ``revoked`` name the others, so the message
    says why a policy that lists enough keys still cannot be met.
    """
    if keys < threshold:
        why = ""
        if expired or revoked:
            parts = [f"{len(expired)} expired ({', '.join(expired)})"] if expired else []
            parts += [f"{len(revoked)} revoked ({', '.join(revoked)})"] if revoked else []
            why = f"; not counted: {'; '.join(parts)}"
        raise PolicyError(
            f"trust policy {source} needs {threshold} signer(s) but lists {keys} {'valid ' if why else ''}key(s){why}",
            path=source,
            hint="Add keys with `airpack trust add` (or apply a signed update with `airpack trust apply`), or lower the threshold.",
        )


def check_threshold(signers: list[str], *, threshold: int, where: str, source: str, missing: list[str] | None = None,
                    not_counted: abc.Sequence[NotCounted] = ()) -> None:
    """Enough *distinct* valid trusted keys made a valid signature over the exact payload, or exit 4.

    ``signers`` names each distinct valid policy key whose signature verified;
    ``missing`` the valid policy keys that did not sign, so the refusal can say who
    still has to co-sign; ``not_counted`` the revoked or expired keys whose
    signatures verified but do not count, each named with its state and why.
    """
    if len(signers) >= threshold:
        return
    absent = ", ".join(missing) if missing else "none"
    need = f"{threshold} of {len(signers) + len(missing)} keys" if missing is not None else f"{threshold} keys"
    if not_counted:
        counted = f" ({', '.join(signers)})" if signers else ""
        raise KeyNotValidError(
            f"envelope {where}: {len(signers)} valid trusted signer(s){counted}, the policy {source} requires {threshold}; "
            f"signatures that do not count: {'; '.join(n.describe() for n in not_counted)}",
            path=where,
            hint=(f"{need} must sign (valid keys that did not: {absent}); a revoked key never counts again and an expired "
                  "one no longer counts. Have a valid key co-sign with `airpack sign BUNDLE --key KEY`."),
        )
    if not signers:
        raise SignatureError(
            f"envelope {where}: no valid signature by a key in the trust policy {source}",
            path=where,
            hint=(f"{need} must sign, and none did (policy keys: {absent}): check that this is the bundle you expect "
                  "and that it was signed by keys in this host's trust policy."),
        )
    raise SignatureError(
        f"envelope {where}: {len(signers)} distinct trusted signer(s) ({', '.join(signers)}), the policy requires {threshold}",
        path=where,
        hint=(f"{need} must sign; signed by: {', '.join(signers)}; not signed by: {absent}. "
              "Have one of them co-sign with `airpack sign BUNDLE --key KEY`."),
    )


# -- signed trust policy updates ------------------------------------------------------------------


def check_update_version(*, current: int, new: int, source: str, where: str) -> None:
    """An update must carry a version strictly above the policy in force: the same or a lower one is a replay (exit 4)."""
    if new <= current:
        same = "the same version as" if new == current else "a lower version than"
        raise PolicyReplayError(
            f"trust policy update {where} carries version {new}, {same} the policy in force ({source}, version {current}): "
            "refusing a replayed or already applied update",
            path=where,
        )


def check_update_signers(role: str, signers: abc.Sequence[str], *, threshold: int, version: int, where: str,
                         missing: abc.Sequence[str], not_counted: abc.Sequence[NotCounted] = ()) -> None:
    """The update is signed by ``threshold`` distinct valid keys of one policy (``role``: "current" or "new"), or exit 4.

    TUF's rule for root rotation: the policy in force vouches for its successor
    (so a stolen copy of the new keys alone cannot take a host over), and the
    successor's own keys vouch for it (so the old keys alone cannot hand the
    host to keys nobody holds).
    """
    if len(signers) >= threshold:
        return
    by = ", ".join(signers) if signers else "none"
    extra = f"; signatures that do not count: {'; '.join(n.describe() for n in not_counted)}" if not_counted else ""
    raise PolicyUpdateError(
        f"trust policy update {where}: signed by {len(signers)} valid key(s) of the {role} policy (version {version}: {by}), "
        f"which requires {threshold}{extra}",
        path=where,
        hint=(f"{threshold} distinct valid keys of the {role} policy must sign; not signed by: {', '.join(missing) or 'none'}. "
              "Have them add their signature with `airpack trust sign-update UPDATE.dsse.json --key KEY`; nothing was changed."),
    )
