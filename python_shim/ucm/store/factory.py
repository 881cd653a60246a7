"""UCM's store factory (`ucm.store.factory` in UCM): store classes by name,
imported only when first created."""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

from .ucmstore import UcmKVStoreBase

logger = logging.getLogger("ucm")


class UcmConnectorFactory:
    _registry: dict[str, Callable[[], type[UcmKVStoreBase]]] = {}

    @classmethod
    def register_connector(cls, name: str, module_path: str, class_name: str) -> None:
        """Registers a store class under `name`; its module is imported at the first create_connector."""
        if name in cls._registry:
            raise ValueError(f"store connector {name!r} is already registered")

        def load() -> type[UcmKVStoreBase]:
            return getattr(importlib.import_module(module_path), class_name)

        cls._registry[name] = load

    @classmethod
    def create_connector(cls, connector_name: str, config: dict[str, Any]) -> UcmKVStoreBase:
        """A store of the class registered as `connector_name`, built from UCM's flat connector config."""
        if connector_name not in cls._registry:
            raise ValueError(f"unknown store connector {connector_name!r}; registered: {sorted(cls._registry)}")
        klass = cls._registry[connector_name]()
        if not (isinstance(klass, type) and issubclass(klass, UcmKVStoreBase)):
            raise TypeError(f"{connector_name!r} resolves to {klass!r}, which is not a UcmKVStoreBase")
        logger.info("UCM: creating store connector %s", connector_name)
        return klass(config)


UcmConnectorFactory.register_connector("UcmNfsStore", "ucm.store.nfsstore.nfsstore_connector", "UcmNfsStore")
