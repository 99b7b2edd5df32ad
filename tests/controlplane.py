"""A real, throwaway Kubernetes control plane for integration tests.

Starts etcd, kube-apiserver and (optionally) kube-controller-manager from the
binaries that ``hack/build-controlplane.sh`` builds, all on loopback ports, with
static token users and RBAC, in the style of controller-runtime's envtest.

Pure Python (no pytest needed)::

    with ControlPlane() as cp:
        print(cp.url, cp.kubeconfig, cp.token("alice"))

Binaries are looked up in ``$SIDEGATE_CONTROLPLANE_BIN`` or else the default
cache folder ``${SIDEGATE_CACHE:-~/.cache/sidegate}/controlplane/<k8s-version>/bin``;
when they are missing the build script is run (a cold build takes ~15 minutes
on 2 cores, so prefer ``make controlplane`` beforehand).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-controlplane.sh"
GO_MOD = REPO_ROOT / "hack" / "controlplane" / "go.mod"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
REQUIRED_BINARIES = ("etcd", "kube-apiserver")

# user -> groups. Tokens are random per control plane; see ControlPlane.token().
DEFAULT_USERS: dict[str, tuple[str, ...]] = {
    "admin": ("system:masters",),
    "alice": ("dba-oncall",),
    "bob": ("dba-oncall",),
    "mallory": (),
    "carol": (),
    "ci-deployer": (),
}

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started."""


# --------------------------------------------------------------------------- binaries


def k8s_version() -> str:
    """The k8s.io/kubernetes version that hack/controlplane/go.mod requires."""
    m = re.search(r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+(v\S+)", GO_MOD.read_text(), re.MULTILINE)
    if not m:
        raise ControlPlaneError(f"cannot find k8s.io/kubernetes in {GO_MOD}")
    return m.group(1)


def default_bin_dir() -> Path:
    cache = os.environ.get("SIDEGATE_CACHE") or str(Path.home() / ".cache" / "sidegate")
    return Path(cache) / "controlplane" / k8s_version() / "bin"


def _has_binaries(bin_dir: Path, names: Sequence[str] = REQUIRED_BINARIES) -> bool:
    return all(os.access(bin_dir / n, os.X_OK) for n in names)


def find_bin_dir(build_if_missing: bool = True) -> Path:
    """Where etcd and kube-apiserver are; builds them when allowed and missing."""
    env = os.environ.get("SIDEGATE_CONTROLPLANE_BIN")
    if env:
        bin_dir = Path(env)
        if not _has_binaries(bin_dir):
            raise ControlPlaneError(f"SIDEGATE_CONTROLPLANE_BIN={env} lacks {', '.join(REQUIRED_BINARIES)}")
        return bin_dir
    bin_dir = default_bin_dir()
    if _has_binaries(bin_dir):
        return bin_dir
    if not build_if_missing:
        raise ControlPlaneError(f"no control plane binaries in {bin_dir}: run `make controlplane`")
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
    lines = proc.stdout.strip().splitlines()
    built = Path(lines[-1]) if lines else bin_dir
    if not _has_binaries(built):
        raise ControlPlaneError(f"{BUILD_SCRIPT} ran but {built} lacks the binaries")
    return built


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_private(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _make_certs(cert_dir: Path) -> dict[str, Path]:
    """A throwaway CA, a serving cert for 127.0.0.1/localhost/kubernetes.default, and an SA key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(hours=1)
    not_after = now + datetime.timedelta(days=2)

    def pem_key(key: Any) -> bytes:
        return bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sidegate-test-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    srv_key = ec.generate_private_key(ec.SECP256R1())
    first_service_ip = next(ipaddress.IPv4Network(SERVICE_CLUSTER_IP_RANGE).hosts())
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.IPAddress(first_service_ip),
    ]
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sa_pub = sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    paths = {
        "ca_cert": cert_dir / "ca.crt",
        "ca_key": cert_dir / "ca.key",
        "serving_cert": cert_dir / "apiserver.crt",
        "serving_key": cert_dir / "apiserver.key",
        "sa_key": cert_dir / "sa.key",
        "sa_pub": cert_dir / "sa.pub",
    }
    paths["ca_cert"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["ca_key"], pem_key(ca_key))
    paths["serving_cert"].write_bytes(
        srv_cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    _write_private(paths["serving_key"], pem_key(srv_key))
    # kube-controller-manager wants a traditional (PKCS#1) RSA key for signing SA tokens.
    _write_private(
        paths["sa_key"],
        sa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )
    paths["sa_pub"].write_bytes(sa_pub)
    return paths


# --------------------------------------------------------------------------- control plane


class _Proc:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()

    def tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on loopback ports.

    Attributes after start(): ``url``, ``ca_file``, ``kubeconfig`` (admin),
    ``etcd_url``, ``workdir``, ``log_file`` (written by stop()), ``users``.
    """

    def __init__(
        self,
        *,
        controller_manager: bool | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
        users: Mapping[str, Sequence[str]] | None = None,
        build_if_missing: bool = True,
        start_timeout: float = 90.0,
        log_dir: str | os.PathLike[str] | None = None,
        extra_apiserver_args: Sequence[str] = (),
        keep_workdir: bool = False,
    ) -> None:
        """controller_manager: True requires it, False skips it, None starts it when built."""
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir(build_if_missing)
        if not _has_binaries(self.bin_dir):
            raise ControlPlaneError(f"{self.bin_dir} lacks {', '.join(REQUIRED_BINARIES)}")
        kcm_built = _has_binaries(self.bin_dir, ("kube-controller-manager",))
        if controller_manager and not kcm_built:
            raise ControlPlaneError(f"kube-controller-manager is not in {self.bin_dir}")
        self.with_controller_manager = kcm_built if controller_manager is None else controller_manager
        self.users: dict[str, tuple[str, ...]] = {
            u: tuple(g) for u, g in (users if users is not None else DEFAULT_USERS).items()
        }
        if "admin" not in self.users:
            self.users["admin"] = ("system:masters",)
        self.start_timeout = start_timeout
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.keep_workdir = keep_workdir
        self.log_dir = Path(
            log_dir
            or os.environ.get("SIDEGATE_CONTROLPLANE_LOG_DIR")
            or Path(tempfile.gettempdir()) / "sidegate-controlplane-logs"
        )
        self._tokens = {u: secrets.token_urlsafe(24) for u in self.users}
        self._procs: list[_Proc] = []
        self._kubeconfigs: dict[str, Path] = {}
        self.workdir: Path | None = None
        self.url = ""
        self.etcd_url = ""
        self.ca_file = ""
        self.kubeconfig = ""
        self.log_file: Path | None = None
        self.controller_manager_port = 0

    # ------------------------------------------------------------------ public API

    def token(self, user: str) -> str:
        return self._tokens[user]

    def groups(self, user: str) -> tuple[str, ...]:
        return self.users[user]

    def kubeconfig_for(self, user: str) -> str:
        """Path of a kubeconfig that authenticates as `user` with its bearer token."""
        if user not in self._kubeconfigs:
            if self.workdir is None:
                raise ControlPlaneError("control plane not started")
            path = self.workdir / "kubeconfigs" / f"{user}.kubeconfig"
            path.parent.mkdir(exist_ok=True)
            cfg = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "sidegate-test",
                        "cluster": {"server": self.url, "certificate-authority": self.ca_file},
                    }
                ],
                "users": [{"name": user, "user": {"token": self.token(user)}}],
                "contexts": [
                    {
                        "name": user,
                        "context": {"cluster": "sidegate-test", "user": user, "namespace": "default"},
                    }
                ],
                "current-context": user,
            }
            # JSON is YAML: kubectl and the kubernetes client both read it.
            _write_private(path, json.dumps(cfg, indent=2) + "\n")
            self._kubeconfigs[user] = path
        return str(self._kubeconfigs[user])

    def api_client(self, user: str = "admin") -> Any:
        """A kubernetes.client.ApiClient for `user` (needs the `kubernetes` package)."""
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=self.kubeconfig_for(user), client_configuration=configuration)
        return client.ApiClient(configuration)

    def get(self, path: str, user: str = "admin", timeout: float = 5.0) -> tuple[int, bytes]:
        """A raw GET against the apiserver: (status, body)."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token(user)}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())

    def start(self) -> ControlPlane:
        if self._procs:
            return self
        last_error: Exception | None = None
        for _attempt in range(3):  # a free port can be taken between probing and binding
            try:
                self._start_once()
                return self
            except ControlPlaneError as e:
                last_error = e
                self.stop()
                if "address already in use" not in str(e).lower():
                    break
        assert last_error is not None
        raise last_error

    def stop(self) -> Path | None:
        """Stop everything (reverse order), gather the logs into self.log_file, remove the workdir."""
        for p in reversed(self._procs):
            p.stop()
        if self._procs:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.log_file = self.log_dir / f"controlplane-{stamp}-{os.getpid()}.log"
            with open(self.log_file, "wb") as out:
                for p in self._procs:
                    out.write(f"===== {p.name} (exit {p.popen.returncode}) =====\n".encode())
                    out.write((" ".join(p.argv) + "\n").encode())
                    with contextlib.suppress(OSError):
                        out.write(p.log_path.read_bytes())
                    out.write(b"\n")
        self._procs = []
        self._kubeconfigs = {}
        if self.workdir is not None and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        with contextlib.suppress(ValueError):
            atexit.unregister(self.stop)
        return self.log_file

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("KUBECONFIG", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")
        }
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
        return env

    def _spawn(self, name: str, argv: list[str]) -> _Proc:
        assert self.workdir is not None
        p = _Proc(name, argv, self.workdir / "logs" / f"{name}.log", self._env())
        self._procs.append(p)
        return p

    def _wait(self, proc: _Proc, what: str, check: Any) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if not proc.alive():
                raise ControlPlaneError(
                    f"{proc.name} exited with code {proc.popen.returncode} before {what}:\n{proc.tail()}"
                )
            try:
                ok, last = check()
                if ok:
                    return
            except (OSError, urllib.error.URLError, ssl.SSLError) as e:
                last = repr(e)
            time.sleep(0.25)
        raise ControlPlaneError(
            f"{proc.name}: timed out after {self.start_timeout}s waiting for {what}"
            f" (last: {last}):\n{proc.tail()}"
        )

    def _start_once(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="sidegate-cp-"))
        (self.workdir / "logs").mkdir()
        cert_dir = self.workdir / "certs"
        cert_dir.mkdir()
        certs = _make_certs(cert_dir)
        self.ca_file = str(certs["ca_cert"])
        atexit.register(self.stop)

        # ---- etcd
        etcd_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd = self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=sidegate-test",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=sidegate-test={peer_url}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )

        def etcd_health() -> tuple[bool, str]:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as resp:
                body = resp.read().decode()
            return '"health":"true"' in body.replace(" ", ""), body

        self._wait(etcd, "etcd /health", etcd_health)

        # ---- kube-apiserver
        token_file = cert_dir / "tokens.csv"
        rows = []
        for i, (user, groups) in enumerate(self.users.items()):
            row = f"{self._tokens[user]},{user},uid-{i}-{user}"
            if groups:
                row += ',"' + ",".join(groups) + '"'
            rows.append(row)
        _write_private(token_file, "\n".join(rows) + "\n")

        api_port = free_port()
        self.url = f"https://127.0.0.1:{api_port}"
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                f"--secure-port={api_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # The `kubernetes` Endpoints may not hold a loopback address: don't try.
                "--endpoint-reconciler-type=none",
                f"--cert-dir={cert_dir}",
                f"--tls-cert-file={certs['serving_cert']}",
                f"--tls-private-key-file={certs['serving_key']}",
                f"--client-ca-file={certs['ca_cert']}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                "--disable-admission-plugins=ServiceAccount",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={certs['sa_pub']}",
                f"--service-account-signing-key-file={certs['sa_key']}",
                f"--token-auth-file={token_file}",
                "--profiling=false",
                "--v=1",
                *self.extra_apiserver_args,
            ],
        )

        def readyz() -> tuple[bool, str]:
            status, body = self.get("/readyz", timeout=3)
            return status == 200 and body.strip() == b"ok", f"{status} {body[:200]!r}"

        try:
            self._wait(apiserver, "/readyz", readyz)
        except ControlPlaneError as e:
            if "address already in use" in apiserver.tail(200).lower():
                raise ControlPlaneError(f"address already in use: {e}") from e
            raise
        self.kubeconfig = self.kubeconfig_for("admin")
        for user in self.users:
            self.kubeconfig_for(user)

        # ---- kube-controller-manager
        if self.with_controller_manager:
            self.controller_manager_port = free_port()
            kcm_certs = self.workdir / "kcm-certs"
            kcm_certs.mkdir()
            kcm = self._spawn(
                "kube-controller-manager",
                [
                    str(self.bin_dir / "kube-controller-manager"),
                    f"--kubeconfig={self.kubeconfig}",
                    f"--authentication-kubeconfig={self.kubeconfig}",
                    f"--authorization-kubeconfig={self.kubeconfig}",
                    "--controllers=*",
                    "--leader-elect=false",
                    "--use-service-account-credentials=false",
                    f"--service-account-private-key-file={certs['sa_key']}",
                    f"--root-ca-file={certs['ca_cert']}",
                    f"--cluster-signing-cert-file={certs['ca_cert']}",
                    f"--cluster-signing-key-file={certs['ca_key']}",
                    f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={self.controller_manager_port}",
                    f"--cert-dir={kcm_certs}",
                    "--profiling=false",
                    "--v=1",
                ],
            )
            insecure = ssl.create_default_context()
            insecure.check_hostname = False
            insecure.verify_mode = ssl.CERT_NONE  # its self-signed serving cert

            def kcm_healthz() -> tuple[bool, str]:
                url = f"https://127.0.0.1:{self.controller_manager_port}/healthz"
                with urllib.request.urlopen(url, timeout=2, context=insecure) as resp:
                    body = resp.read()
                return resp.status == 200 and body.strip() == b"ok", body[:200].decode(errors="replace")

            self._wait(kcm, "kube-controller-manager /healthz", kcm_healthz)
