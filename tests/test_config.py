"""Config loading: defaults, value formats, and errors that name file, line and key."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import (Address, Persistence, ConfigError, load_config, parse_address, parse_config,
                            parse_duration, parse_size)
from gateway.testing.simulators.hl7_messages import make_messages

EXAMPLES = Path(__file__).parent.parent / "examples"

MINIMAL = """
[[vip]]
name = "dicom"
protocol = "dicom"
listen = "0.0.0.0:104"

[[vip.member]]
name = "pacs1"
address = "10.0.0.1:104"
"""


def test_defaults_from_the_seed():
    vip = parse_config(MINIMAL).vip("dicom")
    assert (vip.connect_timeout, vip.assoc_timeout, vip.client_timeout, vip.server_timeout) == (
        4.0, 4.0, 3600.0, 3600.0)
    assert (vip.health.interval, vip.health.timeout, vip.health.rise, vip.health.fall) == (
        5.0, 4.0, 2, 3)
    assert vip.members[0].weight == 100 and vip.error_limit == 3 and vip.ack_timeout == 30.0
    assert vip.mode == "balance" and vip.health.check == "tcp"
    # Study affinity: a calling AE stays on its member for study_window (30 min).
    assert vip.persistence == Persistence("calling-ae", 1800.0, "table")
    assert vip.persistence_implicit and vip.min_up == 1
    assert (vip.failback, vip.failback_after, vip.busy_moves_on) == ("auto", 300.0, True)


def test_implicit_persistence_and_what_turns_it_off():
    dicom = MINIMAL.replace('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nstudy_window = 0')
    assert parse_config(dicom).vip("dicom").persistence is None
    hl7 = MINIMAL.replace('protocol = "dicom"', 'protocol = "hl7"')
    single = parse_config(hl7).vip("dicom")
    assert single.persistence is None  # one member: nothing to keep in order between members
    two = hl7 + '[[vip.member]]\nname = "pacs2"\naddress = "10.0.0.2:104"\n'
    assert parse_config(two).vip("dicom").persistence == Persistence("pid-3", 3600.0, "hash")
    off = two.replace('listen = "0.0.0.0:104"',
                      'listen = "0.0.0.0:104"\npersistence = { key = "none" }')
    assert parse_config(off).vip("dicom").persistence is None
    failover = two.replace('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nmode = "failover"')
    assert parse_config(failover).vip("dicom").persistence is None
    explicit = MINIMAL.replace('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\n'
                               'persistence = { key = "source-ip" }\nstudy_window = "10m"')
    config = parse_config(explicit)
    assert config.vip("dicom").persistence == Persistence("source-ip")  # the config's wins
    assert any("study_window: not used: persistence is set" in w for w in config.warnings)


def test_workers_without_study_affinity_are_warned_of_the_workflow_memorys_delay():
    """With workers, a storage commitment sent right after its images reached another PACS
    in 2 of 12 tries when study_window = 0 (the workflow memory reaches the other workers
    ~150 ms later); with the study window, none did."""
    two = (MINIMAL + '[[vip.member]]\nname = "pacs2"\naddress = "10.0.0.2:104"\n').replace(
        'listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nstudy_window = 0')
    with_workers = "[gateway]\nworkers = 2\n" + two
    (warning,) = parse_config(with_workers, "site.toml").warnings
    assert warning.startswith("site.toml:") and "study_window: with workers = 2" in warning
    assert parse_config(two).warnings == ()
    kept = with_workers.replace("study_window = 0", 'study_window = "30m"')
    assert parse_config(kept).warnings == ()


def test_defaults_section_and_vip_overrides():
    config = parse_config("""
[defaults]
connect_timeout = "2s"
persistence = { key = "source-ip", timeout = "30m" }
health = { interval = "10s" }
""" + MINIMAL.replace('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nclient_timeout = 90\n'
                      'health = { check = "dicom-echo", rise = 5 }'))
    vip = config.vip("dicom")
    assert vip.connect_timeout == 2.0 and vip.assoc_timeout == 2.0  # assoc follows connect
    assert vip.client_timeout == 90.0
    assert vip.persistence.timeout == 1800.0 and vip.persistence.method == "table"
    assert (vip.health.check, vip.health.interval, vip.health.rise) == ("dicom-echo", 10.0, 5)


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("4s", 4.0), ("2m", 120.0), ("1h", 3600.0), ("1d", 86400.0), (7, 7.0),
    (0.25, 0.25), ("1.5s", 1.5), ("30", 30.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["4 sec", "-1s", "", "h", True, [1], -3])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_sizes():
    assert parse_size("16MB") == 16_000_000 and parse_size("1MiB") == 1048576
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize("text, address", [
    ("10.0.0.1:104", Address("10.0.0.1", 104)),
    ("[::1]:104", Address("::1", 104)),
    ("[fe80::1]:11112", Address("fe80::1", 11112)),
    ("pacs1.hospital.local:104", Address("pacs1.hospital.local", 104)),
])
def test_addresses(text, address):
    assert parse_address(text) == address
    assert parse_address(str(address)) == address


@pytest.mark.parametrize("bad, why", [
    ("10.0.0.1", "missing port"), ("::1:104", "brackets"), ("[::1]", "missing port"),
    ("10.0.0.300:104", "not an IPv4 address"), ("10.0.0.1:99999", "0 to 65535"),
    ("[nothex]:1", "not an IPv6 address"), (":104", "missing host"), ("a b:1", "host name"),
])
def test_bad_addresses(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_address(bad)


@given(st.text(max_size=30))
def test_address_parser_only_raises_value_error(text):
    try:
        parse_address(text)
    except ValueError:
        pass


def write(tmp_path, text) -> Path:
    path = tmp_path / "x.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("change, message", [
    (('address = "10.0.0.1:104"', 'address = "10.0.0.1"'),
     'x.toml:9: vip \'dicom\' member \'pacs1\': address: \'10.0.0.1\': missing port'),
    (('protocol = "dicom"', 'protocol = "dicomm"'),
     "x.toml:4: vip 'dicom': protocol: 'dicomm' is not one of 'dicom', 'hl7', 'xds', 'tcp' "
     "(did you mean 'dicom'?)"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nmode = "active"'),
     "x.toml:6: vip 'dicom': mode: 'active' is not one of 'balance', 'failover'"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nhealth = { check = "ping" }'),
     "x.toml:6: vip 'dicom': health: check: 'ping' is not one of 'tcp', 'http'"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\ntimeout_connect = "4s"'),
     "x.toml:6: vip 'dicom': timeout_connect: unknown key (did you mean 'connect_timeout'?) "
     "(allowed: accept_proxy, ack_timeout, "),
    (('name = "pacs1"', 'name = "pacs1"\nwieght = 3'),
     "x.toml:9: vip 'dicom' member 'pacs1': wieght: unknown key (did you mean 'weight'?)"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nconnect_timeout = "soon"'),
     "x.toml:6: vip 'dicom': connect_timeout: 'soon' is not a duration"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\n'
      'persistence = { key = "pid-3" }'),
     "x.toml:6: vip 'dicom': persistence: key: 'pid-3' is not one of 'source-ip', 'calling-ae' "
     "for protocol dicom"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\n'
      'health = { check = "dicom-echo", message = "heartbeat.hl7" }'),
     "x.toml:6: vip 'dicom': health: message: check 'dicom-echo' does not read it "
     "(only hl7-ack do)"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nhealth = { check = "hl7-ack" }'),
     "x.toml:6: vip 'dicom': health: check 'hl7-ack' does not speak dicom (for a dicom VIP: "
     "tcp, dicom-echo, dicom-find)"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\non_busy = "wait"'),
     "x.toml:6: vip 'dicom': on_busy: 'wait' is not one of 'relay', 'next-member'"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nfailback = "never"'),
     "x.toml:6: vip 'dicom': failback: 'never' is not one of 'auto', 'manual'"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nmin_up = -1'),
     "x.toml:6: vip 'dicom': min_up: -1 is not a whole number >= 0"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nstudy_window = "a while"'),
     "x.toml:6: vip 'dicom': study_window: 'a while' is not a duration"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nstatus_window = 0'),
     "x.toml:6: vip 'dicom': status_window: must be more than 0"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nin_doubt = "hold"'),
     "x.toml:6: vip 'dicom': in_doubt: only for protocol hl7 (this VIP is 'dicom')"),
    (('protocol = "dicom"', 'protocol = "hl7"\nin_doubt = "retry"'),
     "vip 'dicom': in_doubt: 'retry' is not one of 'hold', 'next-member'"),
    (('protocol = "dicom"', 'protocol = "hl7"\nin_doubt_answer = "ack"'),
     "vip 'dicom': in_doubt_answer: 'ack' is not one of 'close', 'nak'"),
    (('protocol = "dicom"', 'protocol = "hl7"\nwhen_none_up = "wait"'),
     "vip 'dicom': when_none_up: 'wait' is not one of 'nak', 'close'"),
    (('protocol = "dicom"', 'protocol = "hl7"\nresend_memory = "lots"'),
     "vip 'dicom': resend_memory: 'lots' is not a whole number >= 0"),
    (('protocol = "dicom"', 'protocol = "hl7"\nhl7_application = "GATE|WAY"'),
     "vip 'dicom': hl7_application: 'GATE|WAY': 1 to 180 printable ASCII characters, none of"),
    (('protocol = "dicom"', 'protocol = "hl7"\nhl7_facility = ""'),
     "vip 'dicom': hl7_facility: '': 1 to 180 printable ASCII characters"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nhealth = { check = "dicom-echo", '
      'intervall = "5s" }'),
     "x.toml:6: vip 'dicom': health: intervall: unknown key (did you mean 'interval'?)"),
    (('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\nalgorithm = "leastconns"'),
     "vip 'dicom': algorithm: 'leastconns' is not one of 'roundrobin', 'leastconn' "
     "(did you mean 'leastconn'?)"),
    (('protocol = "dicom"', 'protocol = "hl7"\nstudy_window = "10m"'),
     "vip 'dicom': study_window: only for protocol dicom (this VIP is 'hl7')"),
])
def test_errors_name_file_line_and_key(tmp_path, change, message):
    path = write(tmp_path, MINIMAL.replace(*change))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(str(tmp_path)) and message in text, text
    assert "\n" not in text


def test_duplicate_names_and_listen_addresses(tmp_path):
    doubled = MINIMAL + MINIMAL.split("[[vip.member]]")[1].join(["[[vip.member]]", ""])
    with pytest.raises(ConfigError, match=r"x.toml:11: vip 'dicom' member 'pacs1': name: duplicate"):
        load_config(write(tmp_path, doubled))
    two_vips = MINIMAL + MINIMAL.replace('name = "dicom"', 'name = "dicom2"')
    with pytest.raises(ConfigError, match="0.0.0.0:104 is already used by vip 'dicom'"):
        load_config(write(tmp_path, two_vips))
    with pytest.raises(ConfigError, match="duplicate VIP name"):
        load_config(write(tmp_path, MINIMAL + MINIMAL.replace("0.0.0.0:104", "0.0.0.0:105")))


def test_toml_syntax_error_has_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"x.toml:3: not valid TOML"):
        load_config(write(tmp_path, '[gateway]\nadmin = "127.0.0.1:9090"\nadmin_token = \n'))


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.toml: no such file"):
        load_config("nope.toml")


def test_admin_off_loopback_needs_a_token_and_tls(certs):
    with pytest.raises(ConfigError, match=r"admin: 0.0.0.0:9090 is not a loopback address: "
                                          r"set admin_token \(or admin_ldap\) too"):
        parse_config('[gateway]\nadmin = "0.0.0.0:9090"\n' + MINIMAL)
    with pytest.raises(ConfigError, match="set admin_tls = { cert, key } too"):
        parse_config('[gateway]\nadmin = "0.0.0.0:9090"\nadmin_token = "s3cret"\n' + MINIMAL)
    cert, key = certs.server
    config = parse_config(f'[gateway]\nadmin = "0.0.0.0:9090"\nadmin_token = "s3cret"\n'
                          f'admin_tls = {{ cert = "{cert}", key = "{key}" }}\n' + MINIMAL)
    assert config.gateway.admin_token == "s3cret"
    assert config.gateway.admin_tls.cert == cert


def test_tls_tables_are_checked_by_loading_them(certs):
    cert, key = certs.server
    base = MINIMAL.replace('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\n{vip}')

    def vip(line: str) -> str:
        return base.replace("{vip}", line)

    with pytest.raises(ConfigError, match=r"tls: cert: required"):
        parse_config(vip(f'tls = {{ key = "{key}" }}'))
    with pytest.raises(ConfigError, match=r"tls.cert: '/nope.crt': no such file"):
        parse_config(vip('tls = { cert = "/nope.crt" }'))
    with pytest.raises(ConfigError, match=r"not a certificate and its private key"):
        parse_config(vip(f'tls = {{ cert = "{cert}", key = "{certs.client[1]}" }}'))
    with pytest.raises(ConfigError, match=r"tls.min_version: '1.1' is not one of '1.2', '1.3'"):
        parse_config(vip(f'tls = {{ cert = "{cert}", key = "{key}", min_version = "1.1" }}'))
    with pytest.raises(ConfigError, match=r"tls.verify_client: 'yes' is not one of"):
        parse_config(vip(f'tls = {{ cert = "{cert}", key = "{key}", verify_client = "yes" }}'))
    with pytest.raises(ConfigError, match=r"allowed_clients: needs tls with verify_client"):
        parse_config(vip(f'tls = {{ cert = "{cert}", key = "{key}" }}\n'
                         'allowed_clients = { "CN=ct1" = ["CT1"] }'))
    with pytest.raises(ConfigError, match=r"accept_proxy: set trusted_proxies too"):
        parse_config(vip('accept_proxy = true'))
    with pytest.raises(ConfigError, match=r"forward_client_cert: only for protocol xds"):
        parse_config(vip('forward_client_cert = true'))
    config = parse_config(vip(
        f'tls = {{ cert = "{cert}", key = "{key}", ca = "{certs.ca}", verify_client = "required" }}\n'
        'allowed_clients = { "CN=ct1.hospital.local" = ["CT1", "CT1B"], "DNS:us2" = "US2" }\n'
        'accept_proxy = true\ntrusted_proxies = ["127.0.0.1"]'))
    vip_config = config.vips[0]
    assert vip_config.tls.verify_client == "required" and vip_config.accept_proxy
    assert vip_config.allowed_clients == (("CN=ct1.hospital.local", ("CT1", "CT1B")),
                                          ("DNS:us2", ("US2",)))
    member = MINIMAL.replace('address = "10.0.0.1:104"', 'address = "10.0.0.1:104"\n{m}')
    with pytest.raises(ConfigError, match=r"member 'pacs1': tls: ca '.*server.key': no CA "
                                          r"certificate in PEM"):
        parse_config(member.replace("{m}", f'tls = {{ ca = "{key}" }}'))
    config = parse_config(member.replace("{m}", f'tls = {{ ca = "{certs.ca}", server_name = '
                                                '"pacs1.hospital.local" }\nsend_proxy = true'))
    assert config.vips[0].members[0].tls.server_name == "pacs1.hospital.local"
    assert config.vips[0].members[0].send_proxy


def test_routes_must_name_members():
    text = MINIMAL.replace('listen = "0.0.0.0:104"',
                           'listen = "0.0.0.0:104"\nroutes = { "CARDIO" = ["cpacs"] }')
    with pytest.raises(ConfigError, match="routes: 'CARDIO': no member named 'cpacs'"):
        parse_config(text)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_loads(path):
    config = load_config(path)
    assert config.vips and all(vip.members for vip in config.vips)


def test_the_service_examples_write_only_where_the_unit_lets_them(tmp_path):
    """Copied to /etc/medgate/medgate.toml under packaging/medgate.service (ProtectSystem=
    strict): the audit log in its LogsDirectory, matched by the logrotate config, state and
    the ATNA spool (by default) in its StateDirectory."""
    unit = (EXAMPLES.parent / "packaging" / "medgate.service").read_text()
    logs = "/var/log/" + re.search(r"^LogsDirectory=(\S+)$", unit, re.M).group(1)
    state = "/var/lib/" + re.search(r"^StateDirectory=(\S+)$", unit, re.M).group(1)
    rotated = re.search(r"^(/\S+) \{$", (EXAMPLES.parent / "packaging" / "logrotate.d" /
                                         "medgate").read_text(), re.M).group(1)
    for path in sorted(EXAMPLES.glob("*.toml")):
        if path.name == "local.toml":  # for a try on a laptop: stdout, nothing kept
            continue
        settings = load_config(path).gateway
        assert str(Path(settings.audit).parent) == logs, path.name
        assert fnmatch.fnmatch(settings.audit, rotated), path.name
        assert settings.state_dir == state, path.name
        with_atna = parse_config(path.read_text().replace(
            "[gateway]\n", '[gateway]\natna = { repository = "arr.hospital.local:6514" }\n', 1))
        assert with_atna.gateway.atna.spool == f"{state}/atna", path.name
    without_state = parse_config('[gateway]\natna = { repository = "arr:6514" }\n' + MINIMAL)
    assert without_state.gateway.atna.spool == "/var/spool/medgate/atna"


def test_the_examples_load():
    seed = load_config(EXAMPLES / "seed-hospital.toml")
    assert [v.name for v in seed.vips] == ["dicom", "hl7", "xds", "viewer"]
    dicom = seed.vip("dicom")
    assert [str(a) for a in dicom.listen] == ["0.0.0.0:104", "0.0.0.0:11112"]
    assert dicom.persistence.key == "calling-ae"
    assert dict(dicom.routes) == {"CARDIO": ("cpacs1",), "*": ("pacs1", "pacs2")}
    assert seed.vip("hl7").max_message_bytes == 16_000_000
    assert [m.role for m in seed.vip("xds").members] == ["registry", "repository"]
    local = load_config(EXAMPLES / "local.toml")
    assert [str(a) for a in local.vip("web").listen] == ["127.0.0.1:18443", "[::1]:18443"]


def test_hl7_test_message_path_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "heartbeat.hl7").write_text("MSH|^~\\&|A|B|C|D|2026||NMQ^N01|1|P|2.5\n")
    text = MINIMAL.replace('protocol = "dicom"', 'protocol = "hl7"').replace(
        'listen = "0.0.0.0:104"',
        'listen = "0.0.0.0:2575"\nhealth = { check = "hl7-ack", message = "heartbeat.hl7" }')
    config = load_config(write(tmp_path, text))
    assert config.vip("dicom").health.message == str(tmp_path / "heartbeat.hl7")
    # hl7apy finds an NMQ^N01 without its clock segment: a warning with file:line, not an error
    assert config.warnings == (
        f"{tmp_path / 'x.toml'}:6: vip 'dicom': health: message: "
        f"'{tmp_path / 'heartbeat.hl7'}': hl7apy rejects its structure (ValidationError: "
        "Missing required child NMQ_N01.NMQ_N01_CLOCK_AND_STATISTICS); sent as it is",)
    (tmp_path / "heartbeat.hl7").write_bytes(
        b"\x0b" + make_messages(1, kind="NMD", prefix="HB")[0] + b"ZHB|site heartbeat\r\x1c\r")
    assert load_config(write(tmp_path, text)).warnings == ()  # MLLP-framed, a Z-segment: fine
    with pytest.raises(ConfigError, match=r"x.toml:6: vip 'dicom': health: message: .*"
                                          r"nope.hl7': no such file"):
        load_config(write(tmp_path, text.replace("heartbeat.hl7", "nope.hl7")))


def test_health_keys_from_defaults_for_other_checks_are_left_out(tmp_path):
    text = MINIMAL.replace('listen = "0.0.0.0:104"',
                           'listen = "0.0.0.0:104"\nhealth = { check = "dicom-echo" }')
    text = '[defaults]\nhealth = { calling_ae = "GATEWAY", path = "/health" }\n' + text
    health = load_config(write(tmp_path, text)).vip("dicom").health
    assert (health.check, health.calling_ae, health.path) == ("dicom-echo", "GATEWAY", "/")


def test_dicom_ae_titles_and_xds_repository_ids_are_checked():
    vip = MINIMAL.replace('listen = "0.0.0.0:104"', 'listen = "0.0.0.0:104"\n{line}')
    assert parse_config(vip.replace("{line}", 'ae_titles = ["ARCHIVE"]')).vips[0].ae_titles == (
        "ARCHIVE",)
    with pytest.raises(ConfigError, match=r"ae_titles: 'WAY TOO LONG AE TITLE' is not an AE"):
        parse_config(vip.replace("{line}", 'ae_titles = ["WAY TOO LONG AE TITLE"]'))
    with pytest.raises(ConfigError, match=r"routes: 'CARDIO' is not one of ae_titles"):
        parse_config(vip.replace("{line}", 'ae_titles = ["ARCHIVE"]\n'
                                           'routes = { "CARDIO" = ["pacs1"] }'))
    member = MINIMAL.replace('address = "10.0.0.1:104"',
                             'address = "10.0.0.1:104"\nrepository_unique_id = "1.2.3"')
    with pytest.raises(ConfigError, match=r"repository_unique_id: only for protocol xds"):
        parse_config(member)
    xds = member.replace('protocol = "dicom"', 'protocol = "xds"')
    assert parse_config(xds).vips[0].members[0].repository_unique_id == "1.2.3"
    with pytest.raises(ConfigError, match=r"repository_unique_id: '1.02.x' is not an OID"):
        parse_config(xds.replace('"1.2.3"', '"1.02.x"'))


HL7_ROUTED = """
[[vip]]
name = "hl7"
protocol = "hl7"
listen = "0.0.0.0:2575"
routes = {routes}
[[vip.member]]
name = "lab1"
address = "10.0.0.1:2575"
[[vip.member]]
name = "ris1"
address = "10.0.0.2:2575"
"""


def test_hl7_routes_load_in_order_with_their_fallback():
    vip = parse_config(HL7_ROUTED.replace("{routes}", '''[
  { match = { "MSH-9" = "ORU^R01*", "msh-5" = "LAB" }, members = ["lab1"] },
  { match = "*", members = "ris1" },
]''')).vip("hl7")
    assert [(r.match, r.members) for r in vip.message_routes] == [
        ((("MSH-9", "ORU^R01*"), ("MSH-5", "LAB")), ("lab1",)), ((), ("ris1",))]
    assert vip.route_table() == [("MSH-9=ORU^R01*, MSH-5=LAB", ("lab1",)), ("*", ("ris1",))]


@pytest.mark.parametrize("routes, error", [
    ('{ "ORU" = ["lab1"] }', r"routes: must be a list of routes, e\.g\."),
    ('[{ match = { "PID-3" = "1*" }, members = ["lab1"] }]',
     r"routes: route #1: 'PID-3' is not a field a route matches on \(MSH-3, MSH-4"),
    ('[{ match = { "MSH-9" = "ORU*" }, members = ["lab9"] }]',
     r"routes: route #1: no member named 'lab9' in this VIP"),
    ('[{ match = "*", members = ["ris1"] }, { match = { "MSH-9" = "ORU*" }, members = ["lab1"] }]',
     r"routes: route #2 comes after the \"\*\" route, which matches every message"),
    ('[{ match = { "MSH-9" = "" }, members = ["lab1"] }]', r"routes: route #1: MSH-9: give a glob"),
    ('[{ match = { "MSH-9" = "ORU*" } }]', r"routes: route #1: give exactly match and members"),
])
def test_hl7_route_errors_name_the_route_and_the_line(routes, error):
    with pytest.raises(ConfigError, match=rf"test\.toml:6: vip 'hl7': {error}"):
        parse_config(HL7_ROUTED.replace("{routes}", routes), source="test.toml")


def test_routes_on_a_tcp_vip_are_an_error():
    text = HL7_ROUTED.replace('protocol = "hl7"', 'protocol = "tcp"').replace(
        "{routes}", '[{ match = "*", members = ["lab1"] }]')
    with pytest.raises(ConfigError, match=r"routes: only for protocol dicom or hl7"):
        parse_config(text)


def test_peers_need_the_admin_server_and_its_token():
    base = '[gateway]\nadmin = "127.0.0.1:9090"\n{extra}peers = ["127.0.0.1:9091"]\n' + MINIMAL
    with pytest.raises(ConfigError, match=r"\[gateway\]: peers: the nodes share admin state "
                                          r"through their admin servers and authenticate with "
                                          r"admin_token"):
        parse_config(base.replace("{extra}", ""))
    config = parse_config(base.replace("{extra}", 'admin_token = "t"\n'))
    assert [str(a) for a in config.gateway.peers] == ["127.0.0.1:9091"]
    with pytest.raises(ConfigError, match=r"peers: a list of the other nodes' admin addresses"):
        parse_config(base.replace("{extra}", 'admin_token = "t"\n').replace(
            'peers = ["127.0.0.1:9091"]', 'peers = "127.0.0.1:9091"'))
