"""Hypothesis profiles: the default keeps each fuzz test to a few seconds in CI;
`python3 -m pytest tests/test_codec_fuzz.py --hypothesis-profile=long` runs 100,000 examples."""

from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=300, deadline=None)
settings.register_profile("long", max_examples=100_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")


import datetime
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.helpers import listening, reserved_port, stop_process, wait_started
from tests.helpers.dicom_peers import dcmtk


@dataclass(frozen=True)
class Certs:
    """PEM files of a test PKI: `ca` signs everything but `stranger`; each leaf is a
    (cert, key) pair of paths."""

    ca: str
    server: tuple[str, str]  # localhost, 127.0.0.1, ::1
    server2: tuple[str, str]  # the same names, a second certificate (for SIGHUP tests)
    client: tuple[str, str]  # CN=ct1.hospital.local
    other_client: tuple[str, str]  # CN=us2.hospital.local
    expired: tuple[str, str]  # 127.0.0.1, ended yesterday
    expiring: tuple[str, str]  # 127.0.0.1, ends in 10 days
    wrong_host: tuple[str, str]  # other.example.org only
    stranger: tuple[str, str]  # 127.0.0.1, signed by a CA no one trusts
    stranger_ca: str


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    """A CA with server, client, expired, wrong-host and unknown-CA certificates (RSA, as DCMTK's
    BCP 195 profile expects), written once per test session."""
    folder: Path = tmp_path_factory.mktemp("pki")
    rsa = trustme.KeyType.RSA
    ca, stranger_ca = trustme.CA(key_type=rsa), trustme.CA(key_type=rsa)
    now = datetime.datetime.now(datetime.timezone.utc)

    def leaf(name: str, cert: trustme.LeafCert) -> tuple[str, str]:
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(cert_path)
        cert.private_key_pem.write_to_path(key_path)
        return str(cert_path), str(key_path)

    local = ("localhost", "127.0.0.1", "::1")
    ca.cert_pem.write_to_path(folder / "ca.crt")
    stranger_ca.cert_pem.write_to_path(folder / "stranger-ca.crt")
    return Certs(
        ca=str(folder / "ca.crt"),
        server=leaf("server", ca.issue_cert(*local, key_type=rsa)),
        server2=leaf("server2", ca.issue_cert(*local, common_name="server-2", key_type=rsa)),
        client=leaf("client", ca.issue_cert("ct1.hospital.local", common_name="ct1.hospital.local",
                                            key_type=rsa)),
        other_client=leaf("other-client", ca.issue_cert(
            "us2.hospital.local", common_name="us2.hospital.local", key_type=rsa)),
        expired=leaf("expired", ca.issue_cert(
            *local, not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1), key_type=rsa)),
        expiring=leaf("expiring", ca.issue_cert(
            *local, not_after=now + datetime.timedelta(days=10), key_type=rsa)),
        wrong_host=leaf("wrong-host", ca.issue_cert("other.example.org", key_type=rsa)),
        stranger=leaf("stranger", stranger_ca.issue_cert(*local, key_type=rsa)),
        stranger_ca=str(folder / "stranger-ca.crt"),
    )


@pytest.fixture
def storescp_tls(tmp_path, certs):
    """DCMTK's storescp as a TLS-only PACS that requires a client certificate (its default)."""
    (tmp_path / "received").mkdir()
    port = reserved_port()
    process = wait_started(subprocess.Popen(
        [dcmtk("storescp"), "+tls", certs.server[1], certs.server[0], "-pw", "+cf", certs.ca,
         "-aet", "TLSPACS", "-od", str(tmp_path / "received"), str(port)],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "storescp.log", "wb"),
        start_new_session=True), lambda: listening(port), "storescp +tls")
    yield port
    stop_process(process)
