"""The two ways a hospital PACS is reached: DICOMweb (QIDO-RS search, WADO-RS retrieve, with
``dicomweb-client`` over a ``requests`` session) and DIMSE (C-FIND, then C-GET or C-MOVE, with
``pynetdicom``).

Both backends answer the same three questions for :mod:`hcc_fl.client.pacs`: which studies match
a StudyInstanceUID or an accession number, which series (with their instances' tags) a study
holds, and the instances themselves, handed to a ``sink`` one by one. Errors are
:class:`PacsError` with a message that names the PACS address and what failed, never a patient
identifier or a UID.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydicom.dataset import Dataset

if TYPE_CHECKING:
    from hcc_fl.client.pacs_config import PacsConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
# Both libraries log UIDs (and pynetdicom whole identifiers) at INFO: keep them off a default
# log unless a caller chose their level.
for _name in ("dicomweb_client", "pynetdicom"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)


class PacsError(RuntimeError):
    """The PACS could not be searched or read (message free of identifiers)."""


class PacsAuthError(PacsError):
    """The PACS refused our credentials or AE title (not retried)."""


class RetryableError(PacsError):
    """A transient failure (connection, timeout, 5xx, refused association): retried."""


@dataclass
class InstanceInfo:
    """One instance of a series, from the search: what selection and verification need."""

    sop_uid: str
    sop_class: str = ""
    frames: int = 1
    number: int | None = None
    temporal_position: int | None = None
    trigger_time_ms: float | None = None
    acquisition_time_s: float | None = None


@dataclass
class SeriesInfo:
    """One series of a study with its instances."""

    uid: str
    modality: str
    description: str
    number: int | None
    instances: list[InstanceInfo] = field(default_factory=list)

    @property
    def max_frames(self) -> int:
        return max((i.frames for i in self.instances), default=0)


Sink = Callable[[str, Dataset], None]


class Backend(Protocol):
    """What :func:`hcc_fl.client.pacs.pull` needs from a PACS."""

    address: str

    def check(self) -> None: ...

    def find_studies(self, study_uid: str | None, accession: str | None) -> list[str]: ...

    def series(self, study_uid: str, modalities: frozenset[str]) -> list[SeriesInfo]: ...

    def retrieve(self, study_uid: str, series_uid: str, sop_uids: Sequence[str],
                 sink: Sink) -> None: ...


def with_retries(fn: Callable[[], T], what: str, cfg: PacsConfig) -> T:
    """Call ``fn``; on :class:`RetryableError` wait 0.5 s, 1 s, 2 s, ... (``cfg.retries`` times)."""
    delay = cfg.backoff_s
    for attempt in range(cfg.retries + 1):
        try:
            return fn()
        except RetryableError as exc:
            if attempt == cfg.retries:
                raise PacsError(f"{exc} (after {cfg.retries + 1} attempts to {what})") from None
            log.debug("%s failed (%s); retry %d in %.1f s", what, exc, attempt + 1, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _seconds(value: Any) -> float | None:
    """DICOM TM (HHMMSS.frac) as seconds of the day."""
    text = str(value or "").strip()
    if len(text) < 2 or not text[:2].isdigit():
        return None
    try:
        h, m = int(text[0:2]), int(text[2:4] or 0)
        s = float(text[4:] or 0)
    except ValueError:
        return None
    return h * 3600 + m * 60 + s


# Study Root Query/Retrieve Information Model: FIND, MOVE, GET (PS3.4 C.4).
QR_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
QR_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
QR_GET = "1.2.840.10008.5.1.4.1.2.2.3"

INSTANCE_FIELDS = ("SOPClassUID", "NumberOfFrames", "InstanceNumber")
# Only for MR (the DCE-MRI phase order): a PACS may read every file to answer these.
TIMING_FIELDS = ("TemporalPositionIdentifier", "TriggerTime", "AcquisitionTime")


def instance_fields(modality: str) -> list[str]:
    """The instance-level attributes asked for a series of ``modality``."""
    return [*INSTANCE_FIELDS, *(TIMING_FIELDS if modality == "MR" else ())]


def _instance(get: Callable[[str], Any]) -> InstanceInfo:
    return InstanceInfo(
        sop_uid=str(get("SOPInstanceUID") or ""), sop_class=str(get("SOPClassUID") or ""),
        frames=_int(get("NumberOfFrames")) or 1, number=_int(get("InstanceNumber")),
        temporal_position=_int(get("TemporalPositionIdentifier")),
        trigger_time_ms=_float(get("TriggerTime")),
        acquisition_time_s=_seconds(get("AcquisitionTime")))


# --------------------------------------------------------------------------- DICOMweb


def _json_value(item: dict[str, Any], keyword: str) -> Any:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    entry = item.get(f"{tag:08X}") if tag is not None else None
    values = (entry or {}).get("Value") or []
    if not values:
        return None
    value = values[0]
    if isinstance(value, dict):  # person name
        return value.get("Alphabetic")
    return value


def _getter_json(item: dict[str, Any]) -> Callable[[str], Any]:
    def get(keyword: str) -> Any:
        return _json_value(item, keyword)

    return get


class DicomWebBackend:
    """QIDO-RS and WADO-RS through ``dicomweb_client.DICOMwebClient``."""

    def __init__(self, cfg: PacsConfig) -> None:
        import requests
        from dicomweb_client import DICOMwebClient

        assert cfg.url is not None
        self.cfg = cfg
        self.address = cfg.url
        session = requests.Session()
        session.verify = str(cfg.ca_file) if cfg.ca_file else True
        if cfg.username is not None:
            session.auth = (cfg.username, cfg.password or "")
        if cfg.token is not None:
            session.headers["Authorization"] = f"Bearer {cfg.token}"
        self._local = threading.local()
        self._session_template = session
        self._client_cls = DICOMwebClient

    def _client(self) -> Any:
        """One client (and HTTP session) per thread: requests sessions are not thread-safe."""
        client = getattr(self._local, "client", None)
        if client is None:
            import requests

            session = requests.Session()
            # requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE replace a session's own CA file;
            # the site's ca_file must win, so the environment is not trusted (its proxy
            # settings are still taken).
            session.trust_env = False
            session.proxies = requests.utils.get_environ_proxies(self.address)
            session.verify = self._session_template.verify
            session.auth = self._session_template.auth
            session.headers.update(self._session_template.headers)
            client = self._client_cls(self.address, session=session, timeout=self.cfg.timeout_s)
            # Its own retry loop retries every exception (a refused connection for a minute):
            # ours (with_retries) is bounded by SITE.yaml and gives up on refused credentials.
            client.set_http_retry_params(retry=False)
            self._local.client = client
        return client

    def _call(self, fn: Callable[[Any], T], what: str) -> T:
        import requests

        def once() -> T:
            try:
                return fn(self._client())
            except requests.exceptions.SSLError as exc:
                raise PacsError(f"TLS verification of the PACS at {self.address} failed "
                                f"(check ca_file): {type(exc).__name__}") from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                raise RetryableError(f"cannot reach the PACS at {self.address} "
                                     f"({type(exc).__name__})") from None
            except requests.exceptions.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                if code in (401, 403):
                    raise PacsAuthError(
                        f"the PACS at {self.address} refused the credentials (HTTP {code}): "
                        "check username/password or token in SITE.yaml") from None
                if code in (404,):
                    raise PacsError(f"the PACS at {self.address} has no DICOMweb service at "
                                    "this URL (HTTP 404)") from None
                if code == 429 or code >= 500:
                    raise RetryableError(f"the PACS at {self.address} answered HTTP {code}"
                                         ) from None
                raise PacsError(f"the PACS at {self.address} answered HTTP {code} to "
                                f"{what}") from None

        return with_retries(once, what, self.cfg)

    def check(self) -> None:
        def probe(c: Any) -> Any:
            return c.search_for_studies(limit=1)

        self._call(probe, "search studies")

    def find_studies(self, study_uid: str | None, accession: str | None) -> list[str]:
        filters = {"StudyInstanceUID": study_uid} if study_uid else {"AccessionNumber": accession}

        def search(c: Any) -> list[dict[str, Any]]:
            return list(c.search_for_studies(search_filters=filters))

        found = self._call(search, "search studies")
        return sorted({str(_json_value(s, "StudyInstanceUID")) for s in found
                       if _json_value(s, "StudyInstanceUID")})

    def series(self, study_uid: str, modalities: frozenset[str]) -> list[SeriesInfo]:
        """The study's series; instances are searched only for ``modalities``."""
        def series(c: Any) -> list[dict[str, Any]]:
            return list(c.search_for_series(
                study_uid, fields=["SeriesDescription", "SeriesNumber", "Modality"]))

        out = []
        for item in self._call(series, "search series"):
            info = SeriesInfo(str(_json_value(item, "SeriesInstanceUID") or ""),
                              str(_json_value(item, "Modality") or ""),
                              str(_json_value(item, "SeriesDescription") or ""),
                              _int(_json_value(item, "SeriesNumber")))
            if info.modality in modalities:
                def instances(c: Any, uid: str = info.uid, mod: str = info.modality
                              ) -> list[dict[str, Any]]:
                    return list(c.search_for_instances(study_uid, uid,
                                                       fields=instance_fields(mod)))

                info.instances = [_instance(_getter_json(i))
                                  for i in self._call(instances, "search instances")]
            out.append(info)
        return out

    def retrieve(self, study_uid: str, series_uid: str, sop_uids: Sequence[str],
                 sink: Sink) -> None:
        for sop in sop_uids:
            def one(c: Any, sop: str = sop) -> Dataset:
                return c.retrieve_instance(study_uid, series_uid, sop,
                                           media_types=(("application/dicom", "*"),))

            sink(sop, self._call(one, "retrieve an instance"))


# --------------------------------------------------------------------------- DIMSE


class DimseBackend:
    """C-FIND (study root) and C-GET, or C-MOVE to our own storage SCP, with pynetdicom."""

    def __init__(self, cfg: PacsConfig) -> None:
        self.cfg = cfg
        self.address = f"{cfg.host}:{cfg.port} (AE {cfg.called_ae})"
        self._scp: Any = None
        self._scp_lock = threading.Lock()
        self._move_sinks: dict[str, Sink] = {}

    # ---- associations

    def _ae(self, contexts: str) -> Any:
        from pynetdicom import AE, StoragePresentationContexts

        ae = AE(ae_title=self.cfg.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.cfg.timeout_s
        if contexts == "find":
            ae.add_requested_context(QR_FIND)
        elif contexts == "move":
            ae.add_requested_context(QR_MOVE)
        else:
            ae.add_requested_context(QR_GET)
            # 127 contexts at most per association: the GET model plus the storage classes.
            for cx in StoragePresentationContexts[:126]:
                ae.add_requested_context(str(cx.abstract_syntax))
        return ae

    def _associate(self, contexts: str, handlers: list[Any] | None = None) -> Any:
        from pynetdicom import build_role
        from pynetdicom.presentation import StoragePresentationContexts

        ae = self._ae(contexts)
        roles = ([build_role(str(cx.abstract_syntax), scp_role=True)
                  for cx in StoragePresentationContexts[:126]] if contexts == "get" else [])
        try:
            assoc = ae.associate(self.cfg.host, self.cfg.port, ae_title=self.cfg.called_ae,
                                 ext_neg=roles, evt_handlers=handlers or [])
        except (OSError, RuntimeError) as exc:
            raise RetryableError(f"cannot reach the PACS at {self.address} "
                                 f"({type(exc).__name__})") from None
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            raise PacsAuthError(f"the PACS at {self.address} rejected the association from AE "
                                f"{self.cfg.calling_ae}: check called_ae and calling_ae in "
                                "SITE.yaml and that the PACS knows this AE title")
        raise RetryableError(f"cannot reach the PACS at {self.address} (association "
                             f"{'aborted' if assoc.is_aborted else 'failed'})")

    def _find(self, queries: Sequence[Dataset], what: str) -> list[list[Dataset]]:
        """Answer each C-FIND query, all on one association."""

        def once() -> list[list[Dataset]]:
            assoc = self._associate("find")
            try:
                return [self._find_one(assoc, q, what) for q in queries]
            finally:
                assoc.release()

        return with_retries(once, what, self.cfg)

    def _find_one(self, assoc: Any, query: Dataset, what: str) -> list[Dataset]:
        out: list[Dataset] = []
        for status, identifier in assoc.send_c_find(query, QR_FIND):
            code = int(status.Status) if status is not None and "Status" in status else -1
            if code in (0xFF00, 0xFF01) and identifier is not None:
                out.append(identifier)
            elif code == -1:
                raise RetryableError(f"the PACS at {self.address} did not answer the C-FIND "
                                     f"to {what}")
            elif code != 0:
                raise PacsError(f"the PACS at {self.address} answered C-FIND status "
                                f"0x{code:04X} to {what}")
        return out

    def check(self) -> None:
        def once() -> None:
            self._associate("find").release()

        with_retries(once, "open an association", self.cfg)

    def find_studies(self, study_uid: str | None, accession: str | None) -> list[str]:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = study_uid or ""
        q.AccessionNumber = accession or "" if not study_uid else ""
        found = self._find([q], "search studies")[0]
        return sorted({str(d.StudyInstanceUID) for d in found if d.get("StudyInstanceUID")})

    def series(self, study_uid: str, modalities: frozenset[str]) -> list[SeriesInfo]:
        """The study's series; instances are searched only for ``modalities``."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        q.Modality = ""
        q.SeriesDescription = ""
        q.SeriesNumber = ""
        found = self._find([q], "search series")[0]
        queries = []
        wanted = [ser for ser in found if str(ser.get("Modality", "")) in modalities]
        for ser in wanted:
            qi = Dataset()
            qi.QueryRetrieveLevel = "IMAGE"
            qi.StudyInstanceUID = study_uid
            qi.SeriesInstanceUID = str(ser.SeriesInstanceUID)
            qi.SOPInstanceUID = ""
            for k in instance_fields(str(ser.get("Modality", ""))):
                setattr(qi, k, "")
            queries.append(qi)
        answers = self._find(queries, "search instances") if queries else []
        instances = {str(ser.SeriesInstanceUID): [_instance(d.get) for d in insts]
                     for ser, insts in zip(wanted, answers, strict=True)}
        return [SeriesInfo(str(ser.SeriesInstanceUID), str(ser.get("Modality", "")),
                           str(ser.get("SeriesDescription", "")), _int(ser.get("SeriesNumber")),
                           instances.get(str(ser.SeriesInstanceUID), []))
                for ser in found]

    def retrieve(self, study_uid: str, series_uid: str, sop_uids: Sequence[str],
                 sink: Sink) -> None:
        if self.cfg.retrieve == "move":
            self._move(study_uid, series_uid, sop_uids, sink)
        else:
            self._get(study_uid, series_uid, sop_uids, sink)

    def _query(self, study_uid: str, series_uid: str, sop_uids: Sequence[str]) -> Dataset:
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        q.SOPInstanceUID = list(sop_uids) if len(sop_uids) > 1 else sop_uids[0]
        return q

    def _check_done(self, responses: Iterable[tuple[Dataset, Any]], what: str) -> None:
        last = -1
        for status, _ in responses:
            if status is None or "Status" not in status:
                raise RetryableError(f"the PACS at {self.address} stopped answering the {what}")
            last = int(status.Status)
            if last not in (0x0000, 0xFF00) and last not in (0xB000,):
                raise PacsError(f"the PACS at {self.address} answered {what} status "
                                f"0x{last:04X}")

    def _get(self, study_uid: str, series_uid: str, sop_uids: Sequence[str],
             sink: Sink) -> None:
        from pynetdicom import evt

        wanted = set(sop_uids)

        def on_store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop = str(ds.SOPInstanceUID)
            if sop in wanted:
                sink(sop, ds)
            return 0x0000

        def once() -> None:
            assoc = self._associate("get", [(evt.EVT_C_STORE, on_store)])
            try:
                self._check_done(assoc.send_c_get(
                    self._query(study_uid, series_uid, sop_uids),
                    QR_GET), "C-GET")
            finally:
                assoc.release()

        with_retries(once, "retrieve a series (C-GET)", self.cfg)

    # ---- C-MOVE: the PACS sends the instances to our storage SCP (registered at the PACS).

    def _ensure_scp(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        with self._scp_lock:
            if self._scp is not None:
                return

            def on_store(event: Any) -> int:
                ds = event.dataset
                ds.file_meta = event.file_meta
                sop = str(ds.SOPInstanceUID)
                sink = self._move_sinks.get(sop)
                if sink is not None:
                    sink(sop, ds)
                return 0x0000

            ae = AE(ae_title=self.cfg.calling_ae)
            ae.supported_contexts = AllStoragePresentationContexts
            try:
                self._scp = ae.start_server(("0.0.0.0", self.cfg.move_port), block=False,
                                            evt_handlers=[(evt.EVT_C_STORE, on_store)])
            except OSError as exc:
                raise PacsError(f"cannot listen on port {self.cfg.move_port} for C-MOVE "
                                f"({exc.strerror})") from None

    def _move(self, study_uid: str, series_uid: str, sop_uids: Sequence[str],
              sink: Sink) -> None:

        self._ensure_scp()
        for sop in sop_uids:
            self._move_sinks[sop] = sink

        def once() -> None:
            assoc = self._associate("move")
            try:
                self._check_done(assoc.send_c_move(
                    self._query(study_uid, series_uid, sop_uids), self.cfg.calling_ae,
                    QR_MOVE), "C-MOVE")
            finally:
                assoc.release()

        try:
            with_retries(once, "retrieve a series (C-MOVE)", self.cfg)
        finally:
            for sop in sop_uids:
                self._move_sinks.pop(sop, None)

    def close(self) -> None:
        if self._scp is not None:
            self._scp.shutdown()
            self._scp = None


def make_backend(cfg: PacsConfig) -> DicomWebBackend | DimseBackend:
    """The backend for ``cfg.protocol``."""
    return DicomWebBackend(cfg) if cfg.protocol == "dicomweb" else DimseBackend(cfg)


def dataset_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
