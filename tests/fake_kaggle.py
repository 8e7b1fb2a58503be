"""A fake Kaggle API server, so tests can drive the real kaggle client with no network.

The kaggle client (2.2) sends its calls to http://localhost/api/v1/<Service>/<Method> when
KAGGLE_API_ENVIRONMENT=LOCALHOST, through `requests`, which honours http_proxy: pointing
http_proxy at this server (on 127.0.0.1, a free port) makes it receive every call, plus the
file download it redirects to and the upload PUT. `FakeKaggle.env()` gives those variables
and fake legacy credentials (KAGGLE_USERNAME/KAGGLE_KEY, sent as HTTP basic auth).

It implements what kpipe uses (download files, start upload + PUT + create submission,
list/get submissions, submission limits, competition, leaderboard) and behaves like Kaggle
where kpipe depends on it: submissions read PENDING for the first `pending_polls` reads,
are scored by accuracy against `solution` (public = first half of the sorted ids), a
malformed file ends in ERROR with a description, the daily limit is enforced, unaccepted
rules answer 403, a wrong key 401. `fail_next` / `fail_after` inject errors.
Code competitions too: blob uploads and datasets (create, version, status: PROCESSING for
`dataset_polls` reads, then READY, or FAILED), notebooks (push = save a version; status RUNNING for
`kernel_polls` reads, then COMPLETE with `kernel_outputs` as its files, or ERROR with `kernel_failure`
and `kernel_log`), their output listing, and code submissions scored from the pushed version's
submission.csv (the daily limit applies to them too).
Usage: ``with FakeKaggle("tiny", files, solution) as fake: os.environ.update(fake.env())``
"""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

SERVICE = "/api/v1/competitions.CompetitionApiService/"
# The services the fake answers (/api/v1/<package>.<Service>/<Method>); any other path is a 404.
SERVICES = (
    SERVICE,
    "/api/v1/blobs.BlobApiService/",
    "/api/v1/datasets.DatasetApiService/",
    "/api/v1/kernels.KernelsApiService/",
)
# Methods that need the competition's rules accepted (Kaggle answers 403 otherwise).
NEEDS_RULES = {"DownloadDataFiles", "DownloadDataFile", "StartSubmissionUpload", "CreateSubmission"}


@dataclass
class Submission:
    ref: int
    date: datetime  # naive UTC, as Kaggle stores it
    file_name: str
    description: str
    size: int
    reads_left: int  # answers PENDING until this reaches 0
    status: str  # final status: COMPLETE or ERROR
    public: str = ""
    private: str = ""
    error: str = ""

    def read(self) -> dict[str, Any]:
        """The ApiSubmission JSON; every read brings scoring one step closer."""
        pending = self.reads_left > 0
        self.reads_left = max(0, self.reads_left - 1)
        out = {
            "ref": self.ref,
            "date": _iso(self.date),
            "fileName": self.file_name,
            "totalBytes": self.size,
            "description": self.description,
            "status": "PENDING" if pending else self.status,
            "teamName": "kpipe team",
            "submittedBy": "kpipe-tester",
        }
        if not pending and self.status == "COMPLETE":
            out.update(publicScore=self.public, privateScore=self.private)
        if not pending and self.status == "ERROR":
            out["errorDescription"] = self.error
        return out


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class FakeKaggle:
    def __init__(
        self,
        slug: str,
        files: dict[str, bytes],
        solution: dict[str, str],
        *,
        daily_limit: int = 5,
        pending_polls: int = 1,
        username: str = "kpipe-tester",
        key: str = "fake-key-123",
        rivals: dict[str, float] | None = None,
    ) -> None:
        self.slug, self.files, self.solution = slug, files, solution
        self.daily_limit, self.pending_polls = daily_limit, pending_polls
        self.username, self.key = username, key
        self.rivals = rivals if rivals is not None else {"rival a": 0.95, "rival b": 0.40}
        self.rules_accepted = True
        self.limits_endpoint = True  # False: GetSubmissionLimits answers 404 (an older server)
        self.expose_max_daily = True  # False: GetCompetition has no maxDailySubmissions
        self.calls: list[str] = []  # API method names, in order
        self.uploads: list[bytes] = []  # bodies of upload PUTs
        self.submissions: list[Submission] = []
        self._fail: dict[str, list[int]] = {}
        self._fail_after: dict[str, list[int]] = {}
        self._tokens: dict[str, dict[str, Any]] = {}
        # code competitions
        self.datasets: dict[
            str, dict[str, Any]
        ] = {}  # "owner/slug" -> {"versions": [files], "reads_left": n}
        self.dataset_polls, self.dataset_fails = 1, False
        self.kernels: dict[str, list[dict[str, Any]]] = {}  # "owner/slug" -> versions (the SaveKernel bodies)
        self.kernel_polls = 1
        self.kernel_outputs: dict[str, bytes] = {}  # the files a run writes (set by the test)
        self.kernel_failure: str = ""  # non-empty: runs end in ERROR with this message
        self.kernel_log = "[cell 1] started\n"
        self._kernel_reads: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakeKaggle:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FakeKaggle:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        """Environment that sends the real kaggle client here, with the fake's credentials."""
        return {
            "KAGGLE_API_ENVIRONMENT": "LOCALHOST",
            "http_proxy": self.url,
            "HTTP_PROXY": self.url,
            "KAGGLE_USERNAME": self.username,
            "KAGGLE_KEY": self.key,
        }

    # ------------------------------------------------------------ test controls

    def fail_next(self, method: str, status: int, times: int = 1) -> None:
        """Answer the next `times` calls of `method` with `status`, doing nothing."""
        self._fail.setdefault(method, []).extend([status] * times)

    def fail_after(self, method: str, status: int) -> None:
        """Do the next call of `method`, then answer `status` anyway (a lost reply)."""
        self._fail_after.setdefault(method, []).append(status)

    def add_submission(
        self, file_name: str, data: bytes, description: str = "", when: datetime | None = None
    ) -> int:
        return self._create(file_name, data, description, when or _now()).ref

    # ------------------------------------------------------------ behaviour

    def api(self, method: str, body: dict[str, Any], auth: str | None) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.calls.append(method)
            if auth != "Basic " + base64.b64encode(f"{self.username}:{self.key}".encode()).decode():
                return 401, {"code": 401, "message": "Unauthenticated"}
            if self._fail.get(method):
                status = self._fail[method].pop(0)
                return status, {"code": status, "message": f"fake {status} for {method}"}
            comp = body.get("competitionName")
            if comp is not None and comp != self.slug:
                return 404, {"code": 404, "message": f"Competition '{comp}' not found"}
            if method in NEEDS_RULES and not self.rules_accepted:
                return 403, {"code": 403, "message": "You must accept this competition's rules first"}
            handler = getattr(self, f"_api_{method}", None)
            if handler is None or (method == "GetSubmissionLimits" and not self.limits_endpoint):
                return 404, {"code": 404, "message": f"no such method {method}"}
            status, out = handler(body)
            if self._fail_after.get(method):
                status = self._fail_after[method].pop(0)
                out = {"code": status, "message": f"fake {status} after {method}"}
            return status, out

    def _today(self) -> list[Submission]:
        today = _now().date()
        return [s for s in self.submissions if s.date.date() == today]

    def _create(self, file_name: str, data: bytes, description: str, when: datetime) -> Submission:
        status, public, private, error = self._score(data)
        sub = Submission(
            len(self.submissions) + 1000,
            when,
            file_name,
            description,
            len(data),
            self.pending_polls,
            status,
            public,
            private,
            error,
        )
        self.submissions.append(sub)
        return sub

    def _score(self, data: bytes) -> tuple[str, str, str, str]:
        """(status, public, private, error): accuracy on each half of the sorted solution ids."""
        try:
            rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
        except UnicodeDecodeError:
            return "ERROR", "", "", "Submission file is not UTF-8 text"
        if not rows or rows[0] != ["id", "label"]:
            return (
                "ERROR",
                "",
                "",
                f"Submission must have the columns ['id', 'label']; got {rows[0] if rows else []}",
            )
        preds = {r[0]: r[1] for r in rows[1:] if len(r) == 2}
        if len(rows) - 1 != len(self.solution) or set(preds) != set(self.solution):
            return (
                "ERROR",
                "",
                "",
                f"Submission must have {len(self.solution)} rows with the test ids; got {len(rows) - 1}",
            )
        ids = sorted(self.solution)
        half = (len(ids) + 1) // 2

        def acc(part: list[str]) -> str:
            return f"{sum(preds[i] == self.solution[i] for i in part) / len(part):.5f}"

        return "COMPLETE", acc(ids[:half]), acc(ids[half:]), ""

    # ------------------------------------------------------------ code competitions

    def _api_StartBlobUpload(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        token = f"blob{len(self._tokens)}"
        self._tokens[token] = {"fileName": body.get("name", ""), "data": None}
        return 200, {"token": token, "createUrl": f"http://localhost/upload/{token}"}

    def _dataset_files(self, files: list[dict[str, Any]]) -> dict[str, bytes] | None:
        out = {}
        for f in files:
            blob = self._tokens.get(f.get("token", ""))
            if blob is None or blob["data"] is None:
                return None
            out[blob["fileName"]] = blob["data"]
        return out

    def _api_CreateDataset(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ref = f"{body.get('ownerSlug')}/{body.get('slug')}"
        if ref in self.datasets:
            return 200, {"error": f"The dataset {ref} already exists"}
        files = self._dataset_files(body.get("files", []))
        if files is None:
            return 400, {"code": 400, "message": "Upload not found"}
        self.datasets[ref] = {
            "versions": [files],
            "reads_left": self.dataset_polls,
            "title": body.get("title"),
        }
        return 200, {"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "ok"}

    def _api_CreateDatasetVersion(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ref = f"{body.get('ownerSlug')}/{body.get('datasetSlug')}"
        if ref not in self.datasets:
            return 404, {"code": 404, "message": f"Dataset {ref} not found"}
        files = self._dataset_files((body.get("body") or {}).get("files", []))
        if files is None:
            return 400, {"code": 400, "message": "Upload not found"}
        self.datasets[ref]["versions"].append(files)
        self.datasets[ref]["reads_left"] = self.dataset_polls
        return 200, {"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "ok"}

    def _api_GetDatasetStatus(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ds = self.datasets.get(f"{body.get('ownerSlug')}/{body.get('datasetSlug')}")
        if ds is None:
            return 404, {"code": 404, "message": "Dataset not found"}
        if ds["reads_left"] > 0:
            ds["reads_left"] -= 1
            return 200, {"status": "BLOBS_RECEIVED"}
        return 200, {"status": "FAILED" if self.dataset_fails else "READY"}

    def _api_SaveKernel(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ref = body.get("slug", "")
        missing = [d for d in body.get("datasetDataSources", []) if d not in self.datasets]
        if missing:
            return 200, {"error": f"Dataset sources not found: {missing}"}
        versions = self.kernels.setdefault(ref, [])
        versions.append(
            {
                **body,
                "outputs": dict(self.kernel_outputs),
                "failure": self.kernel_failure,
                "log": self.kernel_log,
            }
        )
        self._kernel_reads[ref] = self.kernel_polls
        return 200, {"ref": ref, "url": f"https://www.kaggle.com/code/{ref}", "versionNumber": len(versions)}

    def _kernel(self, body: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        ref = f"{body.get('userName')}/{body.get('kernelSlug')}"
        versions = self.kernels.get(ref)
        return ref, versions[-1] if versions else None

    def _api_GetKernelSessionStatus(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ref, run = self._kernel(body)
        if run is None:
            return 404, {"code": 404, "message": f"Notebook {ref} not found"}
        if self._kernel_reads.get(ref, 0) > 0:
            self._kernel_reads[ref] -= 1
            return 200, {"status": "RUNNING"}
        if run["failure"]:
            return 200, {"status": "ERROR", "failureMessage": run["failure"]}
        return 200, {"status": "COMPLETE"}

    def _api_ListKernelSessionOutput(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ref, run = self._kernel(body)
        if run is None:
            return 404, {"code": 404, "message": f"Notebook {ref} not found"}
        files = [
            {"fileName": n, "url": f"http://localhost/files/kernel/{ref}/{n}"} for n in sorted(run["outputs"])
        ]
        return 200, {"files": [] if run["failure"] else files, "log": run["log"], "nextPageToken": ""}

    def _api_CreateCodeSubmission(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ref = f"{body.get('kernelOwner')}/{body.get('kernelSlug')}"
        versions = self.kernels.get(ref, [])
        version = body.get("kernelVersion") or len(versions)
        if not 1 <= int(version) <= len(versions):
            return 404, {"code": 404, "message": f"Notebook {ref} version {version} not found"}
        if len(self._today()) >= self.daily_limit:
            return 400, {
                "code": 400,
                "message": f"Submission limit reached: {self.daily_limit} submissions per "
                "day; the count resets at 00:00 UTC",
            }
        run = versions[int(version) - 1]
        name = body.get("fileName") or "submission.csv"
        data = run["outputs"].get(name, b"") if not run["failure"] else b""
        sub = self._create(name, data, body.get("submissionDescription", ""), _now())
        if name not in run["outputs"] or run["failure"]:
            sub.status, sub.error = "ERROR", "Submission CSV Not Found"
        return 200, {"message": "Your submission was queued for a re-run on the hidden test", "ref": sub.ref}

    def _api_DownloadDataFiles(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 302, {"Location": f"http://localhost/files/{self.slug}.zip"}

    def _api_DownloadDataFile(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body.get("fileName", "")
        if name not in self.files:
            return 404, {"code": 404, "message": f"no file {name}"}
        return 302, {"Location": f"http://localhost/files/{name}"}

    def file_bytes(self, name: str) -> bytes | None:
        if name.startswith("kernel/"):
            ref, _, file = name[len("kernel/") :].rpartition("/")
            versions = self.kernels.get(ref)
            return versions[-1]["outputs"].get(file) if versions else None
        if name == f"{self.slug}.zip":
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for rel, data in sorted(self.files.items()):
                    zf.writestr(rel, data)
            return buf.getvalue()
        return self.files.get(name)

    def _api_StartSubmissionUpload(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        token = f"blob{len(self._tokens)}"
        self._tokens[token] = {"fileName": body.get("fileName", ""), "data": None}
        return 200, {"token": token, "createUrl": f"http://localhost/upload/{token}"}

    def upload(self, token: str, data: bytes) -> bool:
        with self._lock:
            if token not in self._tokens:
                return False
            self._tokens[token]["data"] = data
            self.uploads.append(data)
            return True

    def _api_CreateSubmission(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        blob = self._tokens.get(body.get("blobFileTokens", ""))
        if blob is None or blob["data"] is None:
            return 400, {"code": 400, "message": "Upload not found; start the upload again"}
        if len(self._today()) >= self.daily_limit:
            return 400, {
                "code": 400,
                "message": f"Submission limit reached: {self.daily_limit} submissions per "
                "day; the count resets at 00:00 UTC",
            }
        sub = self._create(blob["fileName"], blob["data"], body.get("submissionDescription", ""), _now())
        return 200, {"message": "Successfully submitted to Tiny Competition", "ref": sub.ref}

    def _api_ListSubmissions(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        page, size = int(body.get("page") or 1), int(body.get("pageSize") or 20)
        newest = sorted(self.submissions, key=lambda s: (s.date, s.ref), reverse=True)
        return 200, {"submissions": [s.read() for s in newest[(page - 1) * size : page * size]]}

    def _api_GetSubmission(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        for s in self.submissions:
            if s.ref == int(body.get("ref", 0)):
                return 200, s.read()
        return 404, {"code": 404, "message": "Submission not found"}

    def _api_GetSubmissionLimits(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        used = len(self._today())
        return 200, {
            "numToday": used,
            "numTotal": len(self.submissions),
            "numAllowedNow": max(0, self.daily_limit - used),
        }

    def _api_GetCompetition(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        out: dict[str, Any] = {"id": 1, "ref": self.slug, "title": "Tiny Competition"}
        if self.expose_max_daily:
            out["maxDailySubmissions"] = self.daily_limit
        return 200, out

    def _api_GetLeaderboard(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        teams = dict(self.rivals)
        ours = [float(s.public) for s in self.submissions if s.status == "COMPLETE" and s.reads_left == 0]
        if ours:
            teams["kpipe team"] = max(ours)
        ranked = sorted(teams.items(), key=lambda kv: -kv[1])
        start, size = int(body.get("pageToken") or 0), int(body.get("pageSize") or 20)
        page = ranked[start : start + size]
        rows = [
            {
                "teamId": i + 1,
                "teamName": name,
                "submissionDate": _iso(_now() - timedelta(hours=1)),
                "score": f"{score:.5f}",
            }
            for i, (name, score) in enumerate(page, start)
        ]
        more = start + size < len(ranked)
        return 200, {"submissions": rows, "nextPageToken": str(start + size) if more else ""}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKaggle

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        return

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(
        self,
        status: int,
        body: bytes = b"",
        ctype: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        path, raw = urlsplit(self.path).path, self._body()
        if not path.startswith(SERVICES):
            return self._send(404, b'{"code": 404, "message": "not found"}')
        status, out = self.fake.api(
            path.rsplit("/", 1)[-1], json.loads(raw or b"{}"), self.headers.get("Authorization")
        )
        if status == 302:
            return self._send(302, headers={"Location": out["Location"]})
        self._send(status, json.dumps(out).encode())

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        data = self.fake.file_bytes(path[len("/files/") :]) if path.startswith("/files/") else None
        if data is None:
            return self._send(404, b"not found", "text/plain")
        self._send(200, data, "application/zip" if path.endswith(".zip") else "application/octet-stream")

    def do_PUT(self) -> None:
        path, raw = urlsplit(self.path).path, self._body()
        ok = path.startswith("/upload/") and self.fake.upload(path[len("/upload/") :], raw)
        self._send(200 if ok else 404, b"" if ok else b"unknown upload", "text/plain")
