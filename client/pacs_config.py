"""The ``pacs:`` section of ``SITE.yaml``: where ``hcc-fl-client pull`` finds the images.

    pacs:
      protocol: dicomweb              # dicomweb | dimse
      url: https://pacs.example.org/dicom-web   # dicomweb: the QIDO/WADO root
      ca_file: /etc/hcc-fl/pacs-ca.pem          # dicomweb over HTTPS: CA bundle to verify with
      username: hccfl                 # dicomweb: basic auth user ...
      password_file: /etc/hcc-fl/pacs.pw        # ... and its password (or password_env: VAR)
      token_file: /etc/hcc-fl/pacs.token        # or a bearer token (or token_env: VAR)
      host: pacs.example.org          # dimse: the PACS ...
      port: 104                       # ... its DICOM port ...
      called_ae: PACS                 # ... and AE title
      calling_ae: HCCFL               # dimse: our AE title (registered at the PACS for C-MOVE)
      retrieve: get                   # dimse: get (C-GET) | move (C-MOVE to our port below)
      move_port: 11113                # dimse C-MOVE: where our storage SCP listens
      concurrency: 4                  # patients retrieved at once
      retries: 3                      # retries of a failed request (backoff 0.5 s, 1 s, 2 s...)
      timeout_s: 30
      max_mb_per_s: null              # cap on the retrieval rate (spare a busy PACS)
      series_rules:                   # per task: column -> regular expression on the
        ki67_ceus:                    # SeriesDescription, replacing the built-in rule
          ceus_cine: "kontrast|ceus"

Secrets are never written in SITE.yaml itself: give a file (readable only by the site's user)
or an environment variable. Relative paths are resolved against the folder of SITE.yaml.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hcc_fl.client.site_config import read_site_yaml
from hcc_fl.shared.errors import DataError
from hcc_fl.shared.tasks import TASKS


@dataclass(frozen=True)
class PacsConfig:
    """A validated ``pacs:`` section."""

    protocol: str
    url: str | None = None
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    host: str | None = None
    port: int = 104
    called_ae: str = "ANY-SCP"
    calling_ae: str = "HCCFL"
    retrieve: str = "get"
    move_port: int = 11113
    concurrency: int = 4
    retries: int = 3
    backoff_s: float = 0.5
    timeout_s: float = 30.0
    max_mb_per_s: float | None = None
    series_rules: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class PullTarget:
    """What ``pull`` needs from SITE.yaml besides ``pacs:``: the site, its task and manifest."""

    path: Path
    site: str
    task: str
    manifest: Path


def load_pull_target(path: str | Path) -> PullTarget:
    """``site``, ``task`` and ``manifest`` of SITE.yaml (the coordinator and keys are not
    needed to build the export, so a site can pull before it has them)."""
    path = Path(path)
    doc = read_site_yaml(path)
    for key in ("site", "task", "manifest"):
        if doc.get(key) in (None, ""):
            raise DataError.single(path, "missing required key", column=key)
    if str(doc["task"]) not in TASKS:
        raise DataError.single(path, f"unknown task '{doc['task']}'", column="task")
    manifest = Path(str(doc["manifest"]))
    manifest = manifest if manifest.is_absolute() else (path.parent / manifest).resolve()
    return PullTarget(path, str(doc["site"]), str(doc["task"]), manifest)


def _secret(raw: dict[str, Any], key: str, path: Path) -> str | None:
    if raw.get(f"{key}_file"):
        file = Path(str(raw[f"{key}_file"]))
        file = file if file.is_absolute() else (path.parent / file).resolve()
        if not file.is_file():
            raise DataError.single(path, f"file not found: {file}", column=f"pacs.{key}_file")
        return file.read_text().strip()
    if raw.get(f"{key}_env"):
        var = str(raw[f"{key}_env"])
        if var not in os.environ:
            raise DataError.single(path, f"environment variable {var} is not set",
                                   column=f"pacs.{key}_env")
        return os.environ[var]
    if raw.get(key):
        raise DataError.single(path, f"do not write the {key} in SITE.yaml: give {key}_file "
                               f"or {key}_env", column=f"pacs.{key}")
    return None


def load_pacs_config(path: str | Path) -> PacsConfig:
    """Read the ``pacs:`` section of ``SITE.yaml``; every problem names the file and key."""
    path = Path(path)
    raw = read_site_yaml(path).get("pacs")
    if not isinstance(raw, dict):
        raise DataError.single(path, "no 'pacs:' section (see docs/deployment.md)",
                               column="pacs")

    def key(name: str) -> str:
        return f"pacs.{name}"

    protocol = str(raw.get("protocol", ""))
    if protocol not in ("dicomweb", "dimse"):
        raise DataError.single(path, f"must be dicomweb or dimse, got '{protocol}'",
                               column=key("protocol"))

    def number(name: str, default: float, kind: type = int, lo: float = 0) -> Any:
        value = raw.get(name, default)
        if value is None:
            return None
        try:
            out = kind(value)
        except (TypeError, ValueError):
            raise DataError.single(path, f"must be a number, got {value!r}",
                                   column=key(name)) from None
        if isinstance(value, bool) or out < lo:
            raise DataError.single(path, f"must be a number >= {lo:g}, got {value!r}",
                                   column=key(name))
        return out

    rules = raw.get("series_rules") or {}
    if not isinstance(rules, dict):
        raise DataError.single(path, "must map task -> column -> regular expression",
                               column=key("series_rules"))
    clean_rules: dict[str, dict[str, str]] = {}
    for task, table in rules.items():
        if task not in TASKS or not isinstance(table, dict):
            raise DataError.single(path, f"unknown task '{task}' (or not a mapping)",
                                   column=key("series_rules"))
        for col, rx in table.items():
            names = {c.name for c in TASKS[task].columns}
            if col not in names:
                raise DataError.single(path, f"task {task} has no column '{col}'",
                                       column=key(f"series_rules.{task}"))
            try:
                re.compile(str(rx))
            except re.error as exc:
                raise DataError.single(path, f"not a regular expression ({exc})",
                                       column=key(f"series_rules.{task}.{col}")) from None
        clean_rules[str(task)] = {str(c): str(r) for c, r in table.items()}
    ca = raw.get("ca_file")
    ca_file = None
    if ca:
        ca_file = Path(str(ca))
        ca_file = ca_file if ca_file.is_absolute() else (path.parent / ca_file).resolve()
        if not ca_file.is_file():
            raise DataError.single(path, f"file not found: {ca_file}", column=key("ca_file"))
    cfg = PacsConfig(
        protocol=protocol,
        url=str(raw["url"]).rstrip("/") if raw.get("url") else None,
        ca_file=ca_file,
        username=str(raw["username"]) if raw.get("username") else None,
        password=_secret(raw, "password", path),
        token=_secret(raw, "token", path),
        host=str(raw["host"]) if raw.get("host") else None,
        port=number("port", 104, lo=1),
        called_ae=str(raw.get("called_ae", "ANY-SCP")),
        calling_ae=str(raw.get("calling_ae", "HCCFL")),
        retrieve=str(raw.get("retrieve", "get")),
        move_port=number("move_port", 11113, lo=1),
        concurrency=number("concurrency", 4, lo=1),
        retries=number("retries", 3),
        timeout_s=number("timeout_s", 30.0, float, lo=0.1),
        max_mb_per_s=number("max_mb_per_s", None, float, lo=0.001),  # type: ignore[arg-type]
        series_rules=clean_rules,
    )
    if protocol == "dicomweb" and not cfg.url:
        raise DataError.single(path, "missing required key for protocol dicomweb",
                               column=key("url"))
    if protocol == "dimse" and not cfg.host:
        raise DataError.single(path, "missing required key for protocol dimse",
                               column=key("host"))
    if cfg.retrieve not in ("get", "move"):
        raise DataError.single(path, f"must be get or move, got '{cfg.retrieve}'",
                               column=key("retrieve"))
    for name in ("called_ae", "calling_ae"):
        ae = getattr(cfg, name)
        if not (1 <= len(ae) <= 16) or not ae.isascii() or "\\" in ae:
            raise DataError.single(path, f"an AE title is 1-16 ASCII characters, got {ae!r}",
                                   column=key(name))
    return cfg
