"""A hospital's site configuration (``SITE.yaml``), read and checked at the site.

    site: site_A                        # the name the coordinator registered (hcc-fl certs)
    role: train                         # train | external (evaluation only)
    task: ki67_ceus                     # the task this site's data is approved for
    manifest: /data/export/manifest.csv # the site's manifest (paths inside are relative to it)
    coordinator: coordinator.example.org:9092
    ca_certificate: /etc/hcc-fl/ca.crt  # from the coordinator (public)
    private_key: /etc/hcc-fl/site_A.key # this site's key (private; never leaves the site)
    insecure: false                     # true only for local tests (no TLS, no site key)
    runtime_port: 9094                  # local port of the SuperNode's runtime API
    max_retries: 0                      # connection attempts before giving up (0 = no limit)
    allowed_code_versions: []           # coordinator hcc-fl versions accepted besides our own
    audit_log: audit.jsonl              # this site's audit log (default: in the state folder)
    privacy_budget: 10.0                # total epsilon per dataset over all DP runs (none: no cap)
    disclosure:                         # what this site's statistics may say (docs/privacy.md)
      mode: cells                       # cells (default) | exact
      min_cell: 5                       # every released count is 0 or >= min_cell
      min_split: 10                     # nothing is released about a split of fewer patients
      cell_width: 0.01                  # candidate score cells that the site merges
    secagg_peers: /etc/hcc-fl/peers     # SecAgg+: the consortium's <site>.pub of every site,
                                        # distributed with the certificates (not by the
                                        # coordinator); needed to take part in SecAgg+
    secagg_min_sites: 3                 # SecAgg+: the fewest sites this site aggregates with
    max_image_mb: 2048                  # per-image decode limit in MiB, checked before decoding
    allowed_roots: []                   # folders besides the manifest's that paths may point into

Relative paths are resolved against the folder of the YAML file. An optional ``pacs:`` section
(where ``hcc-fl-client pull`` fetches the images) is read by :mod:`hcc_fl.client.pacs_config`,
which needs only ``site``, ``task`` and ``manifest`` besides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hcc_fl.client.decode_check import DEFAULT_MAX_IMAGE_MB
from hcc_fl.shared.disclosure import ReleasePolicy
from hcc_fl.shared.errors import DataError
from hcc_fl.shared.tasks import TASKS


@dataclass(frozen=True)
class SiteConfig:
    """A validated site configuration."""

    path: Path
    site: str
    role: str
    task: str
    manifest: Path
    coordinator: str
    ca_certificate: Path | None
    private_key: Path | None
    insecure: bool
    runtime_port: int
    max_retries: int = 0
    allowed_code_versions: tuple[str, ...] = ()
    audit_log: Path | None = None
    privacy_budget: float | None = None
    disclosure: ReleasePolicy = ReleasePolicy()
    secagg_peers: Path | None = None  # folder of the peers' <site>.pub (from the consortium)
    secagg_min_sites: int = 3  # the fewest sites this site runs secure aggregation with
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB
    allowed_roots: tuple[Path, ...] = ()


def read_site_yaml(path: Path) -> dict[str, Any]:
    """The mapping in ``SITE.yaml``; a missing file, bad YAML or a non-mapping is a DataError
    naming the file (every reader of SITE.yaml starts here)."""
    if not path.is_file():
        raise DataError.single(path, "site configuration not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DataError.single(path, f"not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise DataError.single(path, "expected a mapping of keys to values")
    return raw


def load_site_config(path: str | Path, role: str | None = None) -> SiteConfig:
    """Read ``SITE.yaml``; every problem names the file and the key.

    ``role`` (from ``--role``) overrides the file's role.
    """
    path = Path(path)
    raw = read_site_yaml(path)

    def need(key: str) -> str:
        value = raw.get(key)
        if value in (None, ""):
            raise DataError.single(path, "missing required key", column=key)
        return str(value)

    def resolve(value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (path.parent / p).resolve()

    insecure = bool(raw.get("insecure", False))
    the_role = role or str(raw.get("role", "train"))
    if the_role not in ("train", "external"):
        raise DataError.single(path, f"role must be train or external, got '{the_role}'",
                               column="role")
    task = need("task")
    if task not in TASKS:
        raise DataError.single(path, f"unknown task '{task}'", column="task")
    allowed = raw.get("allowed_code_versions") or []
    if not isinstance(allowed, list) or not all(isinstance(v, str) for v in allowed):
        raise DataError.single(path, "must be a list of version strings (e.g. "
                               "'0.1.0+2cd551d3fd1e')", column="allowed_code_versions")
    try:
        runtime_port, max_retries = int(raw.get("runtime_port", 9094)), int(
            raw.get("max_retries", 0))
    except (TypeError, ValueError) as exc:
        raise DataError.single(path, f"runtime_port and max_retries must be integers ({exc})",
                               column="runtime_port") from exc
    budget = raw.get("privacy_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or budget <= 0):
        raise DataError.single(path, f"must be a positive number (total epsilon), got {budget!r}",
                               column="privacy_budget")
    raw_policy = raw.get("disclosure") or {}
    if not isinstance(raw_policy, dict):
        raise DataError.single(path, "must be a mapping (mode, min_cell, min_split, cell_width)",
                               column="disclosure")
    try:
        policy = ReleasePolicy.from_mapping(raw_policy)
    except (TypeError, ValueError) as exc:
        raise DataError.single(path, str(exc), column="disclosure") from None
    peers = raw.get("secagg_peers")
    min_sites = raw.get("secagg_min_sites", 3)
    if isinstance(min_sites, bool) or not isinstance(min_sites, int) or min_sites < 2:
        raise DataError.single(path, f"must be an integer >= 2, got {min_sites!r}",
                               column="secagg_min_sites")
    max_mb = raw.get("max_image_mb", DEFAULT_MAX_IMAGE_MB)
    if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not (
            0 < max_mb < float("inf")):
        raise DataError.single(path, "must be a positive number of MiB (the per-image decode "
                               "limit)", column="max_image_mb")
    roots = raw.get("allowed_roots") or []
    if not isinstance(roots, list) or not all(isinstance(r, str) and r for r in roots):
        raise DataError.single(path, "must be a list of folder paths", column="allowed_roots")
    cfg = SiteConfig(
        path=path, site=need("site"), role=the_role, task=task,
        manifest=resolve(need("manifest")), coordinator=need("coordinator"),
        ca_certificate=None if insecure else resolve(need("ca_certificate")),
        private_key=None if insecure else resolve(need("private_key")),
        insecure=insecure, runtime_port=runtime_port, max_retries=max_retries,
        allowed_code_versions=tuple(allowed),
        audit_log=resolve(str(raw["audit_log"])) if raw.get("audit_log") else None,
        privacy_budget=None if budget is None else float(budget),
        disclosure=policy,
        secagg_peers=resolve(str(peers)) if peers else None, secagg_min_sites=min_sites,
        max_image_mb=float(max_mb),
        allowed_roots=tuple(resolve(r) for r in roots),
    )
    if cfg.secagg_peers is not None and not cfg.secagg_peers.is_dir():
        raise DataError.single(path, f"folder not found: {cfg.secagg_peers}",
                               column="secagg_peers")
    for key, file in (("ca_certificate", cfg.ca_certificate), ("private_key", cfg.private_key)):
        if file is not None and not file.is_file():
            raise DataError.single(path, f"file not found: {file}", column=key)
    return cfg
