"""The seed's YAML config, read the way the engine reads it.

Only what the Python side needs is interpreted here (storage_backends to find
the engine's endpoint, and a few client options); the engine validates the
whole file and refuses bad values itself.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass, field
from typing import Any

import yaml

CONNECTOR_NAME = "UcmNfsStore"


class ConfigError(ValueError):
    """A config problem, naming the key and the value."""


#: The client options the shim reads. Their defaults belong to the engine's
#: config module (core/config.ts, OPTIONS); ENGINE_DEFAULTS repeats them for
#: the time before the engine answers, and test_config.py checks them against
#: that table. The two timeouts a config file leaves out are then taken from
#: the engine's `hello` reply (StoreConfig.adopt), so shim and engine agree
#: whatever the engine was started with. loadAsync is not: the scheduler and
#: the workers decide with it in different processes, so it stays what the
#: config file says.
ENGINE_DEFAULTS: dict[str, Any] = {"clientTimeoutMs": 5000, "loadTimeoutMs": 30000, "loadAsync": False}
ADOPTED = {"clientTimeoutMs": "timeout_ms", "loadTimeoutMs": "load_timeout_ms"}


@dataclass
class StoreConfig:
    storage_backends: str
    endpoint: str
    config_file: str | None
    raw: dict[str, Any]
    #: milliseconds any single request to the engine may take
    timeout_ms: int = ENGINE_DEFAULTS["clientTimeoutMs"]
    #: milliseconds a load may take before its blocks count as failed
    load_timeout_ms: int = ENGINE_DEFAULTS["loadTimeoutMs"]
    #: load KV asynchronously (the request waits outside the batch)
    load_async: bool = ENGINE_DEFAULTS["loadAsync"]
    #: the ucm_connector_config section (the engine's settings)
    connector_config: dict[str, Any] = field(default_factory=dict)
    #: a user besides this one and root whose engine the shim may use (engineUid; ucm.engine_trust)
    engine_uid: int | None = None

    def adopt(self, settings: dict[str, Any]) -> None:
        """Takes the engine's timeouts (its `hello` reply's settings) where
        this config names none."""
        for key, attr in ADOPTED.items():
            v = settings.get(key)
            if key not in self.connector_config and type(v) is int and v > 0:
                setattr(self, attr, v)

    def on_hello(self, client: Any, engine: dict[str, Any]) -> None:
        """EngineClient's hook after each hello: adopt, and time requests by the result."""
        self.adopt(engine.get("settings") or {})
        client.timeout_ms = self.timeout_ms

    @property
    def storage_backends_absolute(self) -> str:
        """storage_backends with each directory absolute, as the engine resolves them."""
        return ":".join(_absolute(d) for d in self.storage_backends.split(":"))


def _absolute(d: str) -> str:
    # As Node's path.resolve: relative to the working directory, normalized,
    # one leading slash (POSIX lets normpath keep two).
    p = os.path.normpath(os.path.join(os.getcwd(), d.strip()))
    return "/" + p.lstrip("/")


def runtime_base() -> str:
    """Mirror of core/config.ts runtimeBase: $XDG_RUNTIME_DIR/ucm when
    XDG_RUNTIME_DIR is a real directory of this user that nobody else may
    enter (nobody can make anything there first), else /tmp/ucm-<uid>."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        try:
            st = os.lstat(xdg)
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            return os.path.join(xdg, "ucm")
    return os.path.join(tempfile.gettempdir(), f"ucm-{os.getuid()}")


def runtime_dir(storage_backends: str) -> str:
    """Mirror of core/config.ts defaultRuntimeDir: <runtime_base()>/<12 hex
    of the backends as absolute paths>."""
    absolute = ":".join(_absolute(d) for d in storage_backends.split(":"))
    digest = hashlib.sha256(absolute.encode()).hexdigest()[:12]
    return os.path.join(runtime_base(), digest)


def default_endpoint(storage_backends: str) -> str:
    return "ipc://" + os.path.join(runtime_dir(storage_backends), "engine.sock")


def _connector_section(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ConfigError(
            f"{where}: config must be a mapping with ucm_connector_name and ucm_connector_config, got {doc!r}"
        )
    if "ucm_connectors" in doc:
        items = doc["ucm_connectors"]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{where}: ucm_connectors must be a non-empty list, got {items!r}")
        for i, item in enumerate(items):
            if isinstance(item, dict) and item.get("ucm_connector_name") == CONNECTOR_NAME:
                return _checked(item, f"{where}: ucm_connectors[{i}]")
        raise ConfigError(f"{where}: ucm_connectors has no entry named {CONNECTOR_NAME!r}")
    return _checked(doc, where)


def _checked(section: dict[str, Any], where: str) -> dict[str, Any]:
    name = section.get("ucm_connector_name")
    if name != CONNECTOR_NAME:
        raise ConfigError(f"{where}.ucm_connector_name must be {CONNECTOR_NAME!r}, got {name!r}")
    cc = section.get("ucm_connector_config")
    if not isinstance(cc, dict):
        raise ConfigError(f"{where}.ucm_connector_config must be a mapping, got {cc!r}")
    sb = cc.get("storage_backends")
    if not isinstance(sb, str) or not sb.strip():
        raise ConfigError(f"{where}.ucm_connector_config.storage_backends is required, got {sb!r}")
    return cc


def _int(cc: dict[str, Any], key: str, default: int, where: str) -> int:
    v = cc.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{where}.{key} must be a positive integer, got {v!r}")
    return v


def _bool(cc: dict[str, Any], key: str, default: bool, where: str) -> bool:
    v = cc.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}.{key} must be true or false, got {v!r}")
    return v


def load_config(source: str | os.PathLike[str] | dict[str, Any]) -> StoreConfig:
    """Reads a config file path or an already parsed config dict: the seed's
    structure ({"ucm_connector_name": "UcmNfsStore", "ucm_connector_config":
    {...}} or the ucm_connectors list), or UCM's flat connector-config dict
    ({"storage_backends": ..., "transferStreamNumber": ...}, UCM's own keys
    mapped as UcmNfsStore maps them)."""
    if isinstance(source, dict) and "storage_backends" in source and not any(k in source for k in INLINE_KEYS):
        from .store.nfsstore.nfsstore_connector import engine_config  # the one mapping of UCM's keys

        source = engine_config(source)
    if isinstance(source, dict):
        doc, where, path = source, "config", None
    else:
        path = os.path.abspath(os.fspath(source))
        try:
            with open(path, encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path!r}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from e
        where = path
    cc = _connector_section(doc, where)
    sb = cc["storage_backends"]
    endpoint = cc.get("endpoint") or default_endpoint(sb)
    if not isinstance(endpoint, str):
        raise ConfigError(f"{where}.endpoint must be a string, got {endpoint!r}")
    engine_uid = cc.get("engineUid")
    if engine_uid is not None and (type(engine_uid) is not int or not 0 <= engine_uid < 2**32):
        raise ConfigError(f"{where}.engineUid must be a uid (an integer from 0), got {engine_uid!r}")
    return StoreConfig(
        storage_backends=sb,
        endpoint=endpoint,
        config_file=path,
        raw=doc,
        timeout_ms=_int(cc, "clientTimeoutMs", ENGINE_DEFAULTS["clientTimeoutMs"], where),
        load_timeout_ms=_int(cc, "loadTimeoutMs", ENGINE_DEFAULTS["loadTimeoutMs"], where),
        load_async=_bool(cc, "loadAsync", ENGINE_DEFAULTS["loadAsync"], where),
        connector_config=dict(cc),
        engine_uid=engine_uid,
    )


#: Keys of kv_connector_extra_config that form a UCM config given inline.
INLINE_KEYS = ("ucm_connector_name", "ucm_connector_config", "ucm_connectors")


def config_from_extra(extra: dict[str, Any]) -> StoreConfig:
    """The connector's config from vLLM's kv_connector_extra_config: the file
    named by UCM_CONFIG_FILE, or (as UCM accepts) the config itself inline:
    {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {...}} or
    the ucm_connectors list form. The connector's own options (ucm_load_*,
    ucm_preempt_wait_ms, ...) may sit beside either."""
    cfg_file = extra.get("UCM_CONFIG_FILE")
    if cfg_file:
        return load_config(cfg_file)
    inline = {k: extra[k] for k in INLINE_KEYS if k in extra}
    if not inline:
        raise ConfigError(
            'kv_connector_extra_config must name the UCM config file, {"UCM_CONFIG_FILE": '
            '"/path/to/ucm_config.yaml"}, or hold the config inline: {"ucm_connector_name": "UcmNfsStore", '
            f'"ucm_connector_config": {{"storage_backends": "/mnt/kv"}}}}; got keys {sorted(extra)}'
        )
    return load_config(inline)
