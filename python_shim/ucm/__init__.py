"""UCM NFS Store: the Python side (store API and vLLM connector).

Python translates; the engine process (core/, TypeScript) decides; its native
addon (native/, C++) moves the bytes. No KV bytes pass through this package.
"""

from __future__ import annotations

import json
import os
import re


def _version() -> str:
    """The version has one source: the "version" of the project's
    package.json. The wheel carries that file with the engine
    (ucm/_engine/package.json); a checkout has it at its root. Its npm form
    is written the PEP 440 way (1.2.0-rc.1 -> 1.2.0rc1)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(here, "_engine", "package.json"), os.path.join(here, "..", "..", "package.json")):
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("name") == "ucm-nfs-store" and isinstance(doc.get("version"), str):
            return pep440(doc["version"])
    try:  # installed without either file (a wheel of the shim alone)
        from importlib.metadata import version

        return version("ucm-nfs-store")
    except Exception:
        return "0+unknown"


def pep440(npm_version: str) -> str:
    """npm's semver as PEP 440: 1.2.3 stays, 1.2.3-alpha.1 / -beta.2 / -rc.3
    become 1.2.3a1 / 1.2.3b2 / 1.2.3rc3, any other suffix a local version."""
    m = re.fullmatch(r"(\d+\.\d+\.\d+)(?:-(alpha|beta|rc)\.?(\d+))?(?:[-+](.+))?", npm_version.strip())
    if not m:
        return "0+" + re.sub(r"[^A-Za-z0-9]+", ".", npm_version).strip(".")
    base, pre, num, rest = m.groups()
    out = base + ({"alpha": "a", "beta": "b", "rc": "rc"}[pre] + num if pre else "")
    return out + ("+" + re.sub(r"[^A-Za-z0-9]+", ".", rest).strip(".") if rest else "")


__version__ = _version()
