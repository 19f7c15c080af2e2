"""PII redaction with the placeholders StarCoder2 trained on.

E-mail addresses -> `<EMAIL>`; keys, tokens and private keys -> `<KEY>` (detect-secrets' token
detectors on the lines that hold a long token-like run, plus private-key blocks and key-named
assignments of high-entropy strings); passwords in `password = "..."` style assignments ->
`<PASSWORD>`; public IPv4/IPv6 addresses -> one of a fixed set of private addresses of the same
family (chosen by a hash of the address, so a redaction is reproducible). Private, loopback,
link-local and documentation-range addresses are not personal data and stay, as do version
strings (an address-like run right after `version`/`v`), reserved example domains and
`git@host` clone URLs. The false-positive rate on look-alikes is measured in tests/test_clean_pii.py.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

EMAIL, KEY, PASSWORD, IP = "<EMAIL>", "<KEY>", "<PASSWORD>", "ip_address"

IPV4_REPLACEMENTS = ("172.16.31.10", "172.16.58.3", "172.16.17.32", "192.168.127.12", "192.168.3.11")
IPV6_REPLACEMENTS = ("fd00:c2b6:b24b:be67:2827:688d:e6a1:6a3b", "fd00:a516:7c1b:17cd:6d81:2137:bd2a:2c5b",
                     "fd00:4d2c:19b4:a6f3:c29e:7f01:5e8a:0b1d", "fd00:8f3e:22aa:91c0:4b5d:e2f7:0c68:3a94")

_GENERIC_TLDS = {"com", "org", "net", "edu", "gov", "mil", "int", "info", "biz", "name", "pro", "mobi",
                 "io", "dev", "app", "ai", "co", "me", "tech", "cloud", "online", "site", "xyz", "email"}
_RESERVED_DOMAINS = re.compile(r"(^|\.)(example\.(com|org|net|edu)|localhost|test|invalid|example)$", re.I)
# Patterns start with a literal or a character set (so `re` skips ahead to candidates fast);
# what may not come before a match is checked in Python, not with a lookbehind.
_EMAIL_AT = re.compile(r"@((?:[A-Za-z0-9-]{1,63}\.)+([A-Za-z]{2,24}))(?![\w(])")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}$")
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\d)")
_IPV6 = re.compile(r"[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
_VERSION_BEFORE = re.compile(r"\b(\w*version\w*|ver|release|rev|v)\s*[:=]?\s*[\"']?\s*$", re.I)
_PRIVATE_KEY = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY( BLOCK)?-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|\Z)",
                          re.S)
# assignments are found from their value (rare: a quoted token) and the name checked before it
_KEY_VALUE = re.compile(r"(?:=|:|=>)\s*[\"']([A-Za-z0-9_\-+/=.]{16,})[\"']")
_KEY_NAME = re.compile(
    r"(?i)(?:api[_-]?key|apikey|secret|token|access[_-]?key|auth[_-]?key|private[_-]?key|client[_-]?secret)"
    r"\w*[\"']?\s*$")
_PASSWORD_VALUE = re.compile(r"(?:=|:|=>)\s*([\"'])([^\"'\s]{4,})\1")
_PASSWORD_NAME = re.compile(r"(?i)(?:password|passwd|passphrase|pwd|db_pass|pass)\w*[\"']?\s*$")
_NAME_WINDOW = 48
_TOKEN_RUN = re.compile(r"[A-Za-z0-9_\-+/=]{16,}")
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-+/=.]*")
_DIGIT = re.compile(r"\d")

_DETECT_SECRETS_PLUGINS = (
    "AWSKeyDetector", "ArtifactoryDetector", "AzureStorageKeyDetector", "CloudantDetector",
    "DiscordBotTokenDetector", "GitHubTokenDetector", "GitLabTokenDetector", "IbmCloudIamDetector",
    "IbmCosHmacDetector", "JwtTokenDetector", "MailchimpDetector", "NpmDetector", "OpenAIDetector",
    "PypiTokenDetector", "SendGridDetector", "SlackDetector", "SoftlayerDetector", "SquareOAuthDetector",
    "StripeDetector", "TelegramBotTokenDetector", "TwilioKeyDetector")


def _entropy(s: str) -> float:
    counts = Counter(s)
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def _looks_random(value: str) -> bool:
    """A secret, not a word, path or placeholder: letters and digits mixed, high entropy."""
    if value.startswith(("$", "{", "<", "%")) or len(set(value)) < 6:
        return False
    has_digit = any(c.isdigit() for c in value)
    has_alpha = any(c.isalpha() for c in value)
    return has_digit and has_alpha and _entropy(value) >= 3.0


@lru_cache(maxsize=1)
def _detectors() -> tuple:
    """detect-secrets' token detectors (not its entropy and keyword ones, which flag lock-file
    hashes and every `password` word), called on a line through `analyze_string` (its
    `scan_line` adds heuristic filters that drop real tokens such as `ghp_...`)."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    by_name = {c.__name__: c for c in get_mapping_from_secret_type_to_class().values()}
    return tuple(by_name[n]() for n in _DETECT_SECRETS_PLUGINS if n in by_name)


def _replacement_ip(addr: str, version: int) -> str:
    pool = IPV4_REPLACEMENTS if version == 4 else IPV6_REPLACEMENTS
    return pool[int.from_bytes(hashlib.blake2b(addr.encode(), digest_size=4).digest(), "little") % len(pool)]


def _is_public(addr: str) -> Optional[int]:
    """The IP version of a public (global unicast) address, else None."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if not ip.is_global or ip.is_multicast:
        return None
    return ip.version


@dataclass
class Redaction:
    text: str
    counts: dict[str, int] = field(default_factory=dict)


def _before_is(text: str, pos: int, extra: str) -> bool:
    """Whether the character before pos is a word character or one of `extra`."""
    if pos == 0:
        return False
    c = text[pos - 1]
    return c.isalnum() or c == "_" or c in extra


def find_spans(text: str) -> list[tuple[int, int, str, str]]:
    """(start, end, replacement, kind) of every PII span found, possibly overlapping."""
    spans: list[tuple[int, int, str, str]] = []
    for m in _PRIVATE_KEY.finditer(text):
        spans.append((m.start(), m.end(), KEY, "key"))
    low = text.lower()
    for m in (_EMAIL_AT.finditer(text) if "@" in text else ()):
        domain, tld = m.group(1), m.group(2)
        lm = _EMAIL_LOCAL.search(text, max(0, m.start() - 64), m.start())
        if lm is None:
            continue
        start = lm.start()
        while start < m.start() and not text[start].isalnum():
            start += 1  # the local part starts with a letter or digit
        local = text[start:m.start()]
        if not local or _before_is(text, start, "._%+-"):
            continue
        if _RESERVED_DOMAINS.search(domain) or local.lower() in ("git", "hg", "noreply", "no-reply"):
            continue
        if len(tld) != 2 and tld.lower() not in _GENERIC_TLDS:
            continue
        spans.append((start, m.end(), EMAIL, "email"))
    for m in _IPV4.finditer(text):
        if _before_is(text, m.start(), "."):
            continue
        if any(len(p) > 1 and p[0] == "0" for p in m.group(0).split(".")):
            continue
        if _VERSION_BEFORE.search(text[max(0, m.start() - 24):m.start()]):
            continue
        v = _is_public(m.group(0))
        if v:
            spans.append((m.start(), m.end(), _replacement_ip(m.group(0), v), "ip"))
    if "::" in text or text.count(":") >= 7:
        for m in _IPV6.finditer(text):
            if _before_is(text, m.start(), ":."):
                continue
            s = m.group(0)
            if s.count(":") < 7 and ("::" not in s or sum(1 for g in s.split(":") if g) < 3):
                continue
            v = _is_public(s)
            if v:
                spans.append((m.start(), m.end(), _replacement_ip(s, v), "ip"))
    for m in (_PASSWORD_VALUE.finditer(text) if "pass" in low or "pwd" in low else ()):
        if not _PASSWORD_NAME.search(text, max(0, m.start() - _NAME_WINDOW), m.start()):
            continue
        value = m.group(2)
        if value.startswith(("$", "{", "<", "%", "*")) or len(set(value)) == 1:
            continue
        spans.append((m.start(2), m.end(2), PASSWORD, "password"))
    has_name = any(w in low for w in ("key", "secret", "token"))
    for m in (_KEY_VALUE.finditer(text) if has_name else ()):
        if _KEY_NAME.search(text, max(0, m.start() - _NAME_WINDOW), m.start()) and _looks_random(m.group(1)):
            spans.append((m.start(1), m.end(1), KEY, "key"))
    spans += _detect_secrets_spans(text)
    return spans


def _detect_secrets_spans(text: str) -> list[tuple[int, int, str, str]]:
    """detect-secrets' detectors on the lines holding a 16+ character token-like run with a
    digit in it (every token they know has one); other lines cannot match and are not scanned."""
    lines: dict[int, int] = {}
    for m in _TOKEN_RUN.finditer(text):
        if _DIGIT.search(m.group(0)) is None:
            continue
        start = text.rfind("\n", 0, m.start()) + 1
        if start not in lines:
            end = text.find("\n", m.end())
            lines[start] = len(text) if end < 0 else end
    out: list[tuple[int, int, str, str]] = []
    if not lines:
        return out
    detectors = _detectors()
    for offset, end in lines.items():
        line = text[offset:end]
        if len(line) >= 4000:
            continue
        for value in {v for d in detectors for v in d.analyze_string(line.rstrip("\r")) if v}:
            pos = line.find(value)
            if pos < 0:
                continue
            # detect-secrets may report only a token's prefix: take the whole token
            start = pos
            while start > 0 and _TOKEN_CHARS.fullmatch(line[start - 1]):
                start -= 1
            end_tok = _TOKEN_CHARS.match(line, pos).end()
            token = line[start:end_tok].strip(".")
            if len(token) >= 8:
                s = offset + line.find(token, start)
                out.append((s, s + len(token), KEY, "key"))
    return out


def redact(text: str) -> Redaction:
    """The text with every PII span replaced; counts per kind of what was replaced."""
    spans = find_spans(text)
    if not spans:
        return Redaction(text, {})
    spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
    out, counts, pos = [], Counter(), 0
    for start, end, repl, kind in spans:
        if start < pos:
            continue  # overlaps a span already replaced (the earlier, longer one wins)
        out.append(text[pos:start])
        out.append(repl)
        counts[kind] += 1
        pos = end
    out.append(text[pos:])
    return Redaction("".join(out), dict(counts))
