"""The Jobs API's client (Ray's ``JobSubmissionClient``), over the head's HTTP service
(controlplane/web/jobs.py): what ``sdk.job_submission`` exports and ``cairn job`` uses.

The address is the service's (``http://HOST:8265``); without one, ``$RAY_ADDRESS`` or
``$CAIRN_ADDRESS`` when it is an http(s) URL (as Ray's CLI), else this machine's head's
(its session's ``dashboard.address``). Requests carry the cluster token
(``$CAIRN_AUTH_TOKEN``, else that of the head on this machine), which the service asks
of requests from other machines. A local ``working_dir`` or ``py_modules`` folder is
packed here and uploaded (``PUT /api/packages/...``) before the job is submitted."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from controlplane import auth
from controlplane import runtime_env_packages as packages
from controlplane.jobs import JobStatus
from controlplane.node_records import local_nodes

ADDRESS_FILE = "dashboard.address"  # (controlplane/web/__main__.py writes it)
_TIMEOUT_S = 60.0

__all__ = ["DriverInfo", "JobDetails", "JobStatus", "JobSubmissionClient", "JobType"]


class JobType:
    """Ray's ``JobType`` values."""

    SUBMISSION = "SUBMISSION"
    DRIVER = "DRIVER"


@dataclass
class DriverInfo:
    id: str
    node_ip_address: str = ""
    pid: str = ""


@dataclass
class JobDetails:
    """Ray's ``JobDetails``: a job submission as the service reports it."""

    type: str
    entrypoint: str
    status: JobStatus
    job_id: str | None = None
    submission_id: str | None = None
    driver_info: DriverInfo | None = None
    message: str | None = None
    error_type: str | None = None
    start_time: int | None = None
    end_time: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    runtime_env: dict[str, Any] = field(default_factory=dict)
    driver_agent_http_address: str | None = None
    driver_node_id: str | None = None
    driver_exit_code: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobDetails:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["status"] = JobStatus(values["status"])
        if values.get("driver_info"):
            values["driver_info"] = DriverInfo(**values["driver_info"])
        return cls(**values)


def default_address() -> str:
    """The service's URL when none is given (see the module's docstring)."""
    for name in ("RAY_ADDRESS", "CAIRN_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value.rstrip("/")
    for node in local_nodes():
        if node.head and node.running:
            try:
                return f"http://{(node.session_dir / ADDRESS_FILE).read_text().strip()}"
            except OSError:
                continue
    raise ConnectionError(
        "no address given, and no head with an HTTP service runs on this machine: pass the "
        "head's (http://HOST:8265) or set RAY_ADDRESS"
    )


def token_for(address: str) -> str | None:
    """The cluster token to send to the service at ``address``."""
    if os.environ.get(auth.TOKEN_ENV):
        return os.environ[auth.TOKEN_ENV]
    where = urlsplit(address).netloc
    for node in local_nodes():
        try:
            if (node.session_dir / ADDRESS_FILE).read_text().strip() == where:
                return auth.read_token(node.session_dir)
        except OSError:
            continue
    return None


class JobSubmissionClient:
    """Ray's ``JobSubmissionClient``: submits and follows jobs over HTTP."""

    def __init__(
        self,
        address: str | None = None,
        create_cluster_if_needed: bool = False,
        cookies: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        verify: bool | str | None = True,
    ) -> None:
        if create_cluster_if_needed:
            raise ValueError(
                "create_cluster_if_needed is not supported: start a cluster with "
                "`cairn start --head` and pass its address"
            )
        if address is not None and "://" not in address:
            address = f"http://{address}"
        if address is not None and not address.startswith(("http://", "https://")):
            raise ValueError(
                f"JobSubmissionClient(address={address!r}): give the head's HTTP service "
                "(http://HOST:8265)"
            )
        self.address = (address or default_address()).rstrip("/")
        self._headers = {str(k): str(v) for k, v in (headers or {}).items()}
        token = token_for(self.address)
        if token is not None and "Authorization" not in self._headers:
            self._headers["Authorization"] = f"Bearer {token}"
        if cookies:
            self._headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        self._default_metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._verify = verify

    def _ssl(self) -> ssl.SSLContext | bool:
        """What ``verify`` says: verify (True), not (False), or with this CA file."""
        if isinstance(self._verify, str):
            return ssl.create_default_context(cafile=self._verify)
        return self._verify is not False

    def _context(self) -> ssl.SSLContext | None:
        """urllib's form of ``_ssl`` (None: the default, verifying)."""
        verify = self._ssl()
        if verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        return verify if isinstance(verify, ssl.SSLContext) else None

    def get_address(self) -> str:
        return self.address

    # -- requests ---------------------------------------------------------------------

    def _request(
        self, method: str, path: str, body: Any = None, *, data: bytes | None = None
    ) -> tuple[int, Any]:
        headers = dict(self._headers)
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            self.address + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(
                request, timeout=_TIMEOUT_S, context=self._context()
            ) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):  # (plain text, then)
                text = json.loads(text).get("error", text)
            return error.code, text
        except urllib.error.URLError as error:
            raise ConnectionError(
                f"Failed to connect to the job service at {self.address}: {error.reason}"
            ) from None

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self._request(method, path, body)
        if status != 200:
            raise RuntimeError(f"Request failed with status code {status}: {answer}")
        return answer

    # -- Ray's methods ----------------------------------------------------------------

    def get_version(self) -> str:
        return str(self._call("GET", "/api/version")["version"])

    def submit_job(
        self,
        *,
        entrypoint: str,
        job_id: str | None = None,
        runtime_env: dict[str, Any] | None = None,
        metadata: dict[str, str] | None = None,
        submission_id: str | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_num_gpus: float | None = None,
        entrypoint_memory: int | None = None,
        entrypoint_resources: dict[str, float] | None = None,
        entrypoint_label_selector: dict[str, str] | None = None,
    ) -> str:
        """Submits a job; returns its submission id. Local folders of ``runtime_env``
        are uploaded first."""
        body: dict[str, Any] = {
            "entrypoint": entrypoint,
            "submission_id": submission_id or job_id,
            "runtime_env": self._uploaded(runtime_env or {}),
            "metadata": {**self._default_metadata, **(metadata or {})},
            "entrypoint_num_cpus": entrypoint_num_cpus,
            "entrypoint_num_gpus": entrypoint_num_gpus,
            "entrypoint_memory": entrypoint_memory,
            "entrypoint_resources": entrypoint_resources,
            "entrypoint_label_selector": entrypoint_label_selector,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return str(self._call("POST", "/api/jobs/", body)["submission_id"])

    def _uploaded(self, runtime_env: dict[str, Any]) -> dict[str, Any]:
        """``runtime_env`` with its local working_dir and py_modules packed, uploaded
        and named by their package URIs (``excludes`` spent on them)."""
        if not isinstance(runtime_env, dict):
            raise TypeError(f"runtime_env must be a dict, got {type(runtime_env).__name__}")
        env = dict(runtime_env)
        excludes = env.pop("excludes", None) or ()
        if "working_dir" in env:
            env["working_dir"] = self._upload(env["working_dir"], excludes, as_module=False)
        if "py_modules" in env:
            env["py_modules"] = [
                self._upload(m, excludes, as_module=True) for m in env["py_modules"]
            ]
        if isinstance(env.get("pip"), str):  # a requirements file: read here, as Ray does
            env["pip"] = _requirements(env["pip"])
        return env

    def _upload(self, path: Any, excludes: Any, *, as_module: bool) -> str:
        if packages.is_package_uri(str(path)):
            return str(path)
        if "://" in str(path):
            raise ValueError(
                f"runtime_env names {str(path)!r:.200}: Cairn takes a local folder or .zip "
                "file (remote URIs are not fetched)"
            )
        data = packages.pack(path, excludes, as_module=as_module)
        digest = packages.digest_of(data)
        where = f"/api/packages/cairn/{digest}{packages.URI_SUFFIX}"
        status, answer = self._request("GET", where)
        if status == 404:
            status, answer = self._request("PUT", where, data=data)
        if status != 200:
            raise RuntimeError(f"Uploading {str(path)!r} failed with status {status}: {answer}")
        return packages.uri_of(digest)

    def get_job_info(self, job_id: str) -> JobDetails:
        return JobDetails.from_json(self._call("GET", f"/api/jobs/{quote(job_id, safe='')}"))

    def get_job_status(self, job_id: str) -> JobStatus:
        return self.get_job_info(job_id).status

    def list_jobs(self) -> list[JobDetails]:
        return [JobDetails.from_json(item) for item in self._call("GET", "/api/jobs/")]

    def get_job_logs(self, job_id: str) -> str:
        return str(self._call("GET", f"/api/jobs/{quote(job_id, safe='')}/logs")["logs"])

    def stop_job(self, job_id: str) -> bool:
        return bool(self._call("POST", f"/api/jobs/{quote(job_id, safe='')}/stop")["stopped"])

    def delete_job(self, job_id: str) -> bool:
        return bool(self._call("DELETE", f"/api/jobs/{quote(job_id, safe='')}")["deleted"])

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        """The job's output as it comes, until the job ends (Ray's websocket)."""
        import aiohttp

        self.get_job_info(job_id)  # an unknown job: RuntimeError, as the other calls
        url = f"{self.address}/api/jobs/{quote(job_id, safe='')}/logs/tail"
        async with (
            aiohttp.ClientSession(headers=self._headers) as session,
            session.ws_connect(url, ssl=self._ssl()) as socket,
        ):
            async for message in socket:
                if message.type == aiohttp.WSMsgType.TEXT:
                    yield message.data
                elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break


def _requirements(path: str) -> list[str]:
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise ValueError(f"runtime_env['pip']: cannot read {path!r}: {exc}") from None
    lines = (line.split(" #", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]
