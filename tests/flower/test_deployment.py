"""A real Flower deployment on loopback: one SuperLink and two SuperNodes as separate processes.

Each process runs in its own session, so stopping it (SIGTERM, then SIGKILL) also stops the
ServerApp and ClientApp processes it started; every one is stopped in teardown, whatever
the test did. ``FLWR_HOME`` points the ``flwr`` CLI at a config written by the test.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("flwr")
from cryptography import x509  # noqa: E402  (a dependency of flwr)
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from fedmeta.flower.app import write_app  # noqa: E402
from flower_cases import BIN, CONNECTION, Processes, free_port, wait_for_port  # noqa: E402

# two rounds of SCAFFOLD with server momentum, evaluated after the last: the strategy carries the momentum and
# the server's control variate, which each round's messages carry to the nodes; clients 0 and 5 train in both
# rounds, from the control variates their SuperNodes kept
DEPLOYED = ["rounds=2", "algorithm.name=scaffold", "algorithm.server_momentum=0.9"]


def write_connection(env: dict[str, str], port: int, root_certificates: Path) -> None:
    security = f'root-certificates = "{root_certificates}"'
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "127.0.0.1:{port}"\n{security}\n')


def start_federation(processes: Processes, tls: dict[str, Path]) -> int:
    """Starts a SuperLink and two SuperNodes (partitions 0 and 1 of 2) over TLS; returns the SuperLink's port."""
    port = free_port()
    security = ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile",
                str(tls["key"])]
    superlink = processes.start("superlink", "flower-superlink", "--host", "127.0.0.1", "--port", str(port),
                                "--disable-runtime-dependency-installation", *security)
    wait_for_port(port, superlink)
    trust = ["--root-certificates", str(tls["ca"])]
    for partition_id in (0, 1):
        processes.start(f"supernode-{partition_id}", "flower-supernode", "--superlink", f"127.0.0.1:{port}",
                        "--port", str(free_port()), "--node-config",
                        f"partition-id={partition_id} num-partitions=2", *trust)
    write_connection(processes.env, port, tls["ca"])
    return port


def run_app(processes: Processes, tmp_path: Path, config) -> None:
    """Writes the config's Flower App and runs it with ``flwr run``, its run directory under tmp_path/flower."""
    app = tmp_path / "fedmeta-app"
    write_app(config, app)
    run = subprocess.run([str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream",
                          "--run-config", f'output_dir="{tmp_path / "flower"}"'],
                         env=processes.env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{processes.logs()}"
    assert "fedmeta: run directory" in run.stdout + run.stderr, processes.logs()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = (builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def write_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and localhost signed by it, and a second, unrelated CA."""
    directory.mkdir()
    ca_key, server_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    files = {
        "ca": _certificate("fedmeta test CA", ca_key, "fedmeta test CA", ca_key, ca=True),
        "cert": _certificate("127.0.0.1", server_key, "fedmeta test CA", ca_key, ca=False),
        "other-ca": _certificate("another CA", other_key, "another CA", other_key, ca=True),
    }
    paths = {}
    for name, certificate in files.items():
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths["key"] = directory / "server.key"
    paths["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return paths


@pytest.mark.slow
@pytest.mark.bits
def test_a_tls_deployment_ends_with_the_local_engines_bits_and_refuses_a_supernode_that_trusts_another_ca(
        tmp_path, processes, tiny, local_run, same_run):
    """One deployment for both (each costs half a minute of Flower's polling): the bits and the TLS refusal."""
    tls = write_certificates(tmp_path / "certificates")
    local = local_run(*DEPLOYED)

    port = start_federation(processes, tls)
    # claims partition 0 too: had it joined, the run would stop on two nodes holding one partition
    impostor = processes.start("impostor", "flower-supernode", "--superlink", f"127.0.0.1:{port}",
                               "--port", str(free_port()), "--node-config", "partition-id=0 num-partitions=2",
                               "--root-certificates", str(tls["other-ca"]), "--max-retries", "1",
                               "--max-wait-time", "20")
    run_app(processes, tmp_path, tiny(tmp_path / "unused", *DEPLOYED))
    impostor.wait(timeout=120)

    same_run(tmp_path / "flower", local)
    log = processes.log("impostor")
    assert impostor.returncode != 0, log
    assert "Exit Code: 305" in log  # Flower's code for a failed TLS handshake
    assert "[SSL: CERTIFICATE_VERIFY_FAILED]" in log
    processes.stop()
    assert [process.poll() is not None for _, process in processes.started] == [True, True, True, True]
