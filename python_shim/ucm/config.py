"""The seed's YAML config (or UCM's current one), read the way the engine reads it.

Only what the Python side needs is interpreted here (storage_backends to find
the engine's endpoint, and a few client options); the engine validates the
values of our own options itself. The structure and every key name are
checked here as the engine checks them: UCM's key names are turned into ours
(ucm.ucm_keys, the engine's core/ucm_keys.ts), and a key nobody documents is
a ConfigError, so that vLLM stops at start with its name rather than the
engine refusing to start later.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import ucm_keys
from .config_error import ConfigError, show
from .ucm_keys import CONNECTOR_NAMES

#: the seed's connector name (UCM's current UcmPipelineStore is taken too: ucm_keys.CONNECTOR_NAMES)
CONNECTOR_NAME = "UcmNfsStore"

__all__ = ["CONNECTOR_NAME", "CONNECTOR_NAMES", "ConfigError", "StoreConfig", "config_from_extra", "load_config"]

#: Every key of ucm_connector_config that is ours (core/options.ts OPTIONS,
#: and storage_backends); test_config.py checks it against the engine's table.
OPTION_KEYS = frozenset(
    {
        "storage_backends",
        "transferStreamNumber",
        "endpoint",
        "odirect",
        "fsync",
        "maxBlockBytes",
        "logLevel",
        "maxKeysPerRequest",
        "uncommittedTimeoutS",
        "lookupCacheTtlS",
        "shutdownTimeoutS",
        "clientCheckMs",
        "clientTimeoutMs",
        "loadTimeoutMs",
        "loadAsync",
        "engineUid",
        "capacity",
        "evictionGraceS",
        "capacitySyncMs",
        "capacityRescanS",
        "maxInflightBytes",
        "maxQueueMs",
        "admitOnSecondSight",
        "metricsPort",
        "metricsHost",
        "metricsSocket",
        "hostCacheBytes",
        "writeBehind",
        "pinnedStagingBytes",
        "cudaCopy",
        "shareWithGroup",
        "maxConnections",
        "maxConnectionsPerProcess",
        "maxSessionsPerProcess",
        "maxNamespacesPerClient",
        "idleConnectionS",
        "heartbeatTimeoutS",
        "lookupTimeoutMs",
        "storeHealth",
        "healthCheckIntervalS",
        "healthCheckTimeoutS",
        "healthWindowSize",
        "healthFailureThreshold",
        "maxLookupKeys",
        "maxRegionsPerClient",
        "maxRegionBytesPerClient",
        "cudaEventTimeoutMs",
    }
)


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
    #: the ucm_connector_config section (the engine's settings), UCM's key names turned into ours
    connector_config: dict[str, Any] = field(default_factory=dict)
    #: a user besides this one and root whose engine the shim may use (engineUid; ucm.engine_trust)
    engine_uid: int | None = None
    #: UCM's store_pipeline, when named ("Cache|Posix" or "Posix")
    store_pipeline: str | None = None
    #: UCM's cache_buffer_capacity_gb in bytes, when given: the engine's Cache stage (hostCacheBytes) with Cache|Posix
    cache_buffer_bytes: int | None = None
    #: the "accepted, no effect here" lines of the UCM keys this config holds
    notes: list[str] = field(default_factory=list)

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


def _connector_section(doc: Any) -> tuple[str, str, dict[str, Any], list[str]]:
    """(connector name, path of its ucm_connector_config, that mapping, notes
    on UCM's top-level keys), as core/config.ts parseConfig finds them; its
    errors are the engine's, word for word."""
    names = " or ".join(show(n) for n in CONNECTOR_NAMES)
    if not isinstance(doc, dict):
        raise ConfigError(f"config must be a mapping with ucm_connector_name and ucm_connector_config, got {show(doc)}")
    notes: list[str] = []
    if "ucm_connectors" in doc:
        items = doc["ucm_connectors"]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"ucm_connectors must be a non-empty list, got {show(items)}")
        idx = next(
            (i for i, c in enumerate(items) if isinstance(c, dict) and c.get("ucm_connector_name") in CONNECTOR_NAMES),
            None,
        )
        if idx is None:
            found = [c.get("ucm_connector_name") if isinstance(c, dict) else c for c in items]
            raise ConfigError(
                f"ucm_connectors has no entry with ucm_connector_name {names}; names found: {show(found)}"
            )
        section, prefix = items[idx], f"ucm_connectors[{idx}]."
        notes += ucm_keys.top_level_notes(doc, ["ucm_connectors"], lambda k: k)
        for k, v in section.items():
            if k not in ("ucm_connector_name", "ucm_connector_config"):
                raise ucm_keys.unknown_key(f"{prefix}{k}", v)
    else:
        section, prefix = doc, ""
        notes += ucm_keys.top_level_notes(doc, ["ucm_connector_name", "ucm_connector_config"], lambda k: k)
    name = section.get("ucm_connector_name")
    if name not in CONNECTOR_NAMES:
        raise ConfigError(f"{prefix}ucm_connector_name must be {names}, got {show(name)}")
    cc = section.get("ucm_connector_config")
    if not isinstance(cc, dict):
        raise ConfigError(f"{prefix}ucm_connector_config must be a mapping, got {show(cc)}")
    return name, f"{prefix}ucm_connector_config", cc, notes


def _int(cc: dict[str, Any], key: str, default: int, named: Any) -> int:
    v = cc.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{named(key)} must be a positive integer, got {show(v)}")
    return v


def _bool(cc: dict[str, Any], key: str, default: bool, named: Any) -> bool:
    v = cc.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{named(key)} must be true or false, got {show(v)}")
    return v


def load_config(source: str | os.PathLike[str] | dict[str, Any]) -> StoreConfig:
    """Reads a config file path or an already parsed config dict: the seed's
    structure ({"ucm_connector_name": "UcmNfsStore", "ucm_connector_config":
    {...}}), the ucm_connectors list, UCM's current form (UcmPipelineStore,
    store_pipeline, UCM's key names), or UCM's flat connector-config dict
    ({"storage_backends": ..., "transferStreamNumber": ...}, UCM's own keys
    mapped as UcmNfsStore maps them). UCM's keys with no effect here are said
    once per process (at INFO: the engine says them in its log too)."""
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
    try:
        name, section, section_cc, notes = _connector_section(doc)
        tr = ucm_keys.translate(section_cc, name, section, OPTION_KEYS)
        cc = tr.raw

        def named(k: str) -> str:
            return f"{section}.{tr.origin[k]} ({k} here)" if k in tr.origin else f"{section}.{k}"

        sb = cc.get("storage_backends")
        if isinstance(sb, list) and sb and all(isinstance(d, str) for d in sb):
            sb = ":".join(sb)  # UCM's own code hands its store a list of directories
        if not isinstance(sb, str) or not sb.strip():
            raise ConfigError(
                f"{section}.storage_backends is required: a directory, or several separated by ':', "
                f"got {show(cc.get('storage_backends'))}"
            )
        cc["storage_backends"] = sb
        endpoint = cc.get("endpoint") or default_endpoint(sb)
        if not isinstance(endpoint, str):
            raise ConfigError(f"{section}.endpoint must be a string, got {show(endpoint)}")
        engine_uid = cc.get("engineUid")
        if engine_uid is not None and (type(engine_uid) is not int or not 0 <= engine_uid < 2**32):
            raise ConfigError(f"{section}.engineUid must be a uid (an integer from 0), got {show(engine_uid)}")
        timeout_ms = _int(cc, "clientTimeoutMs", ENGINE_DEFAULTS["clientTimeoutMs"], named)
        load_timeout_ms = _int(cc, "loadTimeoutMs", ENGINE_DEFAULTS["loadTimeoutMs"], named)
        load_async = _bool(cc, "loadAsync", ENGINE_DEFAULTS["loadAsync"], named)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    notes += tr.notes
    ucm_keys.say_once(notes)
    return StoreConfig(
        storage_backends=sb,
        endpoint=endpoint,
        config_file=path,
        raw=doc,
        timeout_ms=timeout_ms,
        load_timeout_ms=load_timeout_ms,
        load_async=load_async,
        connector_config=cc,
        engine_uid=engine_uid,
        store_pipeline=tr.store_pipeline,
        cache_buffer_bytes=tr.cache_buffer_bytes,
        notes=notes,
    )


def default_cache_bytes() -> int:
    """The Cache stage's size when UCM's config asks for the stage without
    one (core/config.ts defaultCacheBytes): 4 GiB, at most a quarter of the
    host's memory (MemTotal, as Node's os.totalmem() reads it)."""
    total = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if not total:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(4 << 30, total // 4 // 4096 * 4096)


#: Keys of kv_connector_extra_config that form a UCM config given inline.
INLINE_KEYS = ("ucm_connector_name", "ucm_connector_config", "ucm_connectors")


def config_from_extra(extra: dict[str, Any]) -> StoreConfig:
    """The connector's config from vLLM's kv_connector_extra_config: the file
    named by UCM_CONFIG_FILE, or (as UCM accepts) the config itself inline:
    {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {...}} or
    the ucm_connectors list form. The connector's own options (ucm_load_*,
    ucm_preempt_wait_ms, ...) and UCM's top-level keys (use_layerwise, ...)
    may sit beside either."""
    # UCM's top-level keys (use_layerwise, ...) may sit here too: checked and said as in the file.
    top = {k: extra[k] for k in ucm_keys.UCM_TOP_KEYS if k in extra}
    cfg_file = extra.get("UCM_CONFIG_FILE")
    if cfg_file:
        notes = ucm_keys.top_level_notes(top, (), lambda k: f"kv_connector_extra_config.{k}")
        cfg = load_config(cfg_file)
        ucm_keys.say_once(notes)
        cfg.notes = cfg.notes + notes
        return cfg
    inline = {k: extra[k] for k in INLINE_KEYS if k in extra}
    if not inline:
        raise ConfigError(
            'kv_connector_extra_config must name the UCM config file, {"UCM_CONFIG_FILE": '
            '"/path/to/ucm_config.yaml"}, or hold the config inline: {"ucm_connector_name": "UcmNfsStore", '
            f'"ucm_connector_config": {{"storage_backends": "/mnt/kv"}}}}; got keys {sorted(extra)}'
        )
    return load_config({**inline, **top})
