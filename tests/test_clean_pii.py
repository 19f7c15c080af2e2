"""PII redaction: a table of planted secrets (in strings, comments, config files) must come out
with the right placeholder, and a table of look-alikes must stay; the look-alikes' false-positive
rate is measured and bounded (printed with -s)."""

from __future__ import annotations

import pytest

from megatron_sc2.data.prep.clean.pii import IPV4_REPLACEMENTS, IPV6_REPLACEMENTS, redact

# (text, secret that must disappear, placeholder that must appear)
PLANTED = [
    ('author = "Jane Roe <jane.roe@gmail.com>"\n', "jane.roe@gmail.com", "<EMAIL>"),
    ("# Contact: bob.smith+dev@company.co.uk for access\n", "bob.smith+dev@company.co.uk", "<EMAIL>"),
    ("maintainer: alice_w@university.edu\n", "alice_w@university.edu", "<EMAIL>"),
    ('AWS_ACCESS_KEY_ID = "AKIAZ7Q2XJ4MB3LHNP5W"\n', "AKIAZ7Q2XJ4MB3LHNP5W", "<KEY>"),
    ("token: ghp_R7x2Lk9QwErTyUiOpAsDfGhJkLzXcVbNm123\n", "ghp_R7x2Lk9QwErTyUiOpAsDfGhJkLzXcVbNm123", "<KEY>"),
    ('SLACK = "xoxb-2048-4096-Ab3dE6gH9jK2mN5pQ8sT1vW4"\n', "xoxb-2048-4096-Ab3dE6gH9jK2mN5pQ8sT1vW4", "<KEY>"),
    ('stripe.api_key = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"\n', "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "<KEY>"),
    ('api_key = "9f8e7d6c5b4a39281706f5e4d3c2b1a0ZZ"\n', "9f8e7d6c5b4a39281706f5e4d3c2b1a0ZZ", "<KEY>"),
    ('CLIENT_SECRET: "Qm9vWm9vX3NlY3JldF9rZXlfMTIzNDU2Nzg5"\n', "Qm9vWm9vX3NlY3JldF9rZXlfMTIzNDU2Nzg5", "<KEY>"),
    ("key = '''\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA1x8kQ2w\nQkFBQUFBQUFB\n-----END RSA PRIVATE KEY-----\n'''\n",
     "MIIEowIBAAKCAQEA1x8kQ2w", "<KEY>"),
    ('jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"\n',
     "eyJzdWIiOiIxMjM0NTY3ODkwIn0", "<KEY>"),
    ('DB_PASSWORD = "hunter2!Secure"\n', "hunter2!Secure", "<PASSWORD>"),
    ('    "password": "S3cr3t-P4ss",\n', "S3cr3t-P4ss", "<PASSWORD>"),
    ("db:\n  passwd: 'tr0ub4dor&3'\n", "tr0ub4dor&3", "<PASSWORD>"),
    ("server = '203.0.113.77'  # not public: documentation range\nreal = '8.8.4.4'\n", "8.8.4.4", None),
    ("# our box at 34.117.59.81 answers\n", "34.117.59.81", None),
    ('HOST = "2a00:1450:4001:82a::200e"\n', "2a00:1450:4001:82a::200e", None),
]

# texts with no PII in them (each counted once when anything in it is changed)
LOOK_ALIKES = [
    'version = "1.2.3.4"\n', "__version__ = '2.10.3.1'\n", "numpy>=1.26.4\n", "python 3.11.7\n",
    "release: v4.3.2.1\n", "x = 12.34.56\n",
    'uuid = "123e4567-e89b-12d3-a456-426614174000"\n',
    "assert h == 'd41d8cd98f00b204e9800998ecf8427e'\n",
    'integrity sha512-Gq1ErbHbT/ikpgcM9K2yqMu3DjSSnZs8DjLrQKkNpYkgqB9DkY6vBrGvlGxTxBKGvVGRMGYGjgtgn1Q4N/A6lA==\n',
    '"resolved": "https://registry.npmjs.org/lodash/-/lodash-4.17.21.tgz",\n',
    "checksum = \"b5bd1ed0e1cd3e1a4fbcbe3bdfb5a1f6d1e87f3bd0d9da4a3cf2f69c9a5b2a5e\"\n",
    "Listen on 127.0.0.1:8080 (see the docs)\n", "bind 0.0.0.0\n", "gateway 192.168.1.1\n",
    "ip = '10.0.0.254'\n", "169.254.169.254 is the metadata service\n", "::1 localhost\n",
    "std::vector<int> v; a::b::c();\n", "time 12:30:45\n",
    "mail user@example.com for the docs\n", "git clone git@github.com:org/repo.git\n",
    "y = q@k.transpose(-2, -1)\n", "@decorator.attribute\n", "user = 'x'  # email@ in text\n",
    "password = os.environ['DB_PASSWORD']\n", 'password = ""\n', "password: ${DB_PASSWORD}\n",
    'password = "<your password here>"\n', "def check_password(pwd):\n    return pwd == stored\n",
    "token = get_token(request)\n", "secret_len = 16\n", 'api_key = "YOUR_API_KEY_HERE"\n',
    "commit 3f786850e387550fdab836ed7e6dc881de23001b\n", "sha256:3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a\n",
    "color: #ff00aa;\n", "long_identifier_name_with_digits_123 = compute_value_456()\n",
    "https://cdn.jsdelivr.net/npm/bootstrap@5.3.2/dist/css/bootstrap.min.css\n",
    "pip install package==1.0.0.post1\n",
]


@pytest.mark.parametrize("text,secret,placeholder", PLANTED)
def test_planted_pii_is_redacted(text, secret, placeholder):
    out = redact(text).text
    assert secret not in out
    if placeholder is not None:
        assert placeholder in out
    else:  # a public address becomes one of the fixed private ones of its family
        pool = IPV6_REPLACEMENTS if ":" in secret else IPV4_REPLACEMENTS
        assert any(p in out for p in pool)


def test_private_and_documentation_addresses_stay():
    text = PLANTED[14][0]
    assert "203.0.113.77" in redact(text).text


def test_look_alike_false_positive_rate():
    changed = [t for t in LOOK_ALIKES if redact(t).text != t]
    rate = len(changed) / len(LOOK_ALIKES)
    print(f"\nPII look-alikes changed: {len(changed)}/{len(LOOK_ALIKES)} = {rate:.1%}: {changed}")
    assert rate <= 0.05, changed


def test_redaction_is_deterministic_and_counts():
    r1, r2 = redact(PLANTED[15][0] + PLANTED[0][0]), redact(PLANTED[15][0] + PLANTED[0][0])
    assert r1.text == r2.text and r1.counts == {"ip": 1, "email": 1}
