"""What a site accepts from the coordinator as an app bundle (Flower FAB): configuration only.

A site runs only the hcc-fl it installed itself. The bundle that ``flwr run`` ships must
therefore carry nothing but ``pyproject.toml`` (+ ``LICENSE`` and Flower's ``.info/CONTENT``
manifest), its components must name the installed ``hcc_fl`` apps, and the coordinator's
hcc-fl version + code hash must be the site's own or one that the site config allows.
The check runs on the bundle's bytes before Flower installs it and before any of it is
imported (see ``hcc_fl.client.guard``). No Flower import here.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass

ALLOWED_FILES = frozenset({"pyproject.toml", "LICENSE", ".info/CONTENT"})
EXPECTED_COMPONENTS = {
    "serverapp": "hcc_fl.server.flower_app:app",
    "clientapp": "hcc_fl.client.flower_app:app",
}


class BundleRefused(PermissionError):
    """The coordinator's app bundle is not one this site runs (the message says why)."""


@dataclass(frozen=True)
class BundleInfo:
    """An accepted bundle: its SHA-256 and the coordinator's code version."""

    sha256: str
    code_version: str


def check_bundle(fab: bytes, allowed_versions: set[str]) -> BundleInfo:
    """Accept a configuration-only bundle of an allowed hcc-fl version, or raise BundleRefused.

    Parameters
    ----------
    fab
        The bundle's bytes as the SuperNode received them.
    allowed_versions
        hcc-fl code versions (``version+codehash``) this site runs: its own and any the site
        config lists under ``allowed_code_versions``.
    """
    sha = hashlib.sha256(fab).hexdigest()
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
            extra = sorted(set(names) - ALLOWED_FILES)
            if extra:
                shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
                raise BundleRefused(f"app bundle {sha[:12]} carries files other than "
                                    f"configuration ({shown}): this site runs only its "
                                    "installed hcc-fl")
            if "pyproject.toml" not in names:
                raise BundleRefused(f"app bundle {sha[:12]} has no pyproject.toml")
            project = tomllib.loads(zf.read("pyproject.toml").decode("utf-8"))
    except zipfile.BadZipFile as exc:
        raise BundleRefused(f"app bundle {sha[:12]} is not a valid archive") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BundleRefused(f"app bundle {sha[:12]}: pyproject.toml does not parse") from exc
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components", {})
    if components != EXPECTED_COMPONENTS:
        raise BundleRefused(
            f"app bundle {sha[:12]} names components {components!r}; this site runs only "
            f"{EXPECTED_COMPONENTS!r} from its installed hcc-fl"
        )
    version = str(app.get("config", {}).get("code-version", ""))
    if not version:
        raise BundleRefused(f"app bundle {sha[:12]} does not state the coordinator's hcc-fl "
                            "code version")
    if version not in allowed_versions:
        raise BundleRefused(
            f"the coordinator runs hcc-fl {version}; this site runs "
            f"{', '.join(sorted(allowed_versions))} (add it to allowed_code_versions in the "
            "site config to accept it)"
        )
    return BundleInfo(sha, version)
