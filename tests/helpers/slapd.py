"""A real OpenLDAP `slapd` for the admin_ldap tests: a directory of a hospital's people and
groups (nested: alice is in radiology-it, which is in pacs-operators), served over LDAPS and
over LDAP for StartTLS, with the test PKI's server certificate."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import listening, reserved_port, stop_process, wait_started

SUFFIX = "dc=hospital,dc=test"
SERVICE_DN = f"cn=medgate,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "service-secret-0123"
PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "carol": "carol-pw-3"}
OPERATORS = f"cn=pacs-operators,ou=groups,{SUFFIX}"
READERS = f"cn=pacs-readers,ou=groups,{SUFFIX}"

CONFIG = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {folder}/slapd.pid
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
TLSCACertificateFile {ca}
database mdb
maxsize 16777216
suffix "{suffix}"
rootdn "cn=admin,{suffix}"
rootpw root-secret-0123
directory {folder}/db
access to attrs=userPassword by anonymous auth by self read by * none
access to * by dn.exact="{service}" read by * none
"""

PEOPLE = """\
dn: {suffix}
objectClass: dcObject
objectClass: organization
o: Test Hospital
dc: hospital

dn: ou=people,{suffix}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{suffix}
objectClass: organizationalUnit
ou: groups

dn: ou=services,{suffix}
objectClass: organizationalUnit
ou: services

dn: {service}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: medgate
userPassword: {service_password}
"""

PERSON = """
dn: uid={name},ou=people,{suffix}
objectClass: inetOrgPerson
uid: {name}
cn: {name}
sn: {name}
userPassword: {password}
"""

GROUPS = """
dn: cn=radiology-it,ou=groups,{suffix}
objectClass: groupOfNames
cn: radiology-it
member: uid=alice,ou=people,{suffix}

dn: {operators}
objectClass: groupOfNames
cn: pacs-operators
member: cn=radiology-it,ou=groups,{suffix}

dn: {readers}
objectClass: groupOfUniqueNames
cn: pacs-readers
uniqueMember: uid=bob,ou=people,{suffix}
"""


@dataclass
class Slapd:
    ldaps: int  # port of ldaps://
    ldap: int  # port of ldap:// (StartTLS)
    process: subprocess.Popen

    def stop(self) -> None:
        stop_process(self.process)


def start_slapd(folder: Path, certs) -> Slapd:
    """slapd with the directory above, listening on 127.0.0.1. URLs name it 127.0.0.1 (an IP
    address of the test server certificate): libldap checks a certificate against the host's
    own name, not "localhost", when the URL says localhost."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "db").mkdir(exist_ok=True)
    config = folder / "slapd.conf"
    config.write_text(CONFIG.format(folder=folder, cert=certs.server[0], key=certs.server[1],
                                    ca=certs.ca, suffix=SUFFIX, service=SERVICE_DN))
    entries = PEOPLE.format(suffix=SUFFIX, service=SERVICE_DN, service_password=SERVICE_PASSWORD)
    entries += "".join(PERSON.format(name=name, password=password, suffix=SUFFIX)
                       for name, password in PASSWORDS.items())
    entries += GROUPS.format(suffix=SUFFIX, operators=OPERATORS, readers=READERS)
    (folder / "directory.ldif").write_text(entries)
    slapadd = shutil.which("slapadd") or "/usr/sbin/slapadd"
    loaded = subprocess.run([slapadd, "-f", str(config), "-l", str(folder / "directory.ldif")],
                            capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    ldaps, ldap = reserved_port(), reserved_port()
    slapd = shutil.which("slapd") or "/usr/sbin/slapd"
    process = wait_started(subprocess.Popen(
        [slapd, "-f", str(config), "-h", f"ldaps://127.0.0.1:{ldaps}/ ldap://127.0.0.1:{ldap}/",
         "-d", "256"], stdout=subprocess.DEVNULL, stderr=open(folder / "slapd.log", "wb"),
        start_new_session=True), lambda: listening(ldaps) and listening(ldap), "slapd")
    return Slapd(ldaps, ldap, process)
