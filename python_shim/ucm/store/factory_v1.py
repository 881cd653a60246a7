"""UCM's current store factory (`ucm.store.factory_v1` in UCM): stores of its
current interface (ucm.store.ucmstore_v1) by name, imported only when first
created, or by class name from a module of the caller's (`module_path`).
`UcmPipelineStore` and `UcmNfsStore` are registered, both over this package's
engine (ucm.store.pipeline.connector)."""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

from .ucmstore_v1 import UcmKVStoreBaseV1

logger = logging.getLogger("ucm")


class UcmConnectorFactoryV1:
    _registry: dict[str, Callable[[], type[UcmKVStoreBaseV1]]] = {}

    @classmethod
    def register_connector(cls, name: str, module_path: str, class_name: str) -> None:
        """Registers a store class under `name`; its module is imported at the first create_connector."""
        if name in cls._registry:
            raise ValueError(f"store connector {name!r} is already registered")

        def load() -> type[UcmKVStoreBaseV1]:
            return getattr(importlib.import_module(module_path), class_name)

        cls._registry[name] = load

    @classmethod
    def create_connector(
        cls, connector_name: str, config: dict[str, Any], module_path: str | None = None
    ) -> UcmKVStoreBaseV1:
        """A store of the class registered as `connector_name` (or, with
        `module_path`, the class of that name in that module), built from
        UCM's flat store config."""
        if module_path:
            klass = getattr(importlib.import_module(module_path), connector_name)
        elif connector_name in cls._registry:
            klass = cls._registry[connector_name]()
        else:
            raise ValueError(f"unknown store connector {connector_name!r}; registered: {sorted(cls._registry)}")
        if not (isinstance(klass, type) and issubclass(klass, UcmKVStoreBaseV1)):
            raise TypeError(f"{connector_name!r} resolves to {klass!r}, which is not a UcmKVStoreBaseV1")
        logger.info("UCM: creating store connector %s", connector_name)
        return klass(config)


UcmConnectorFactoryV1.register_connector("UcmPipelineStore", "ucm.store.pipeline.connector", "UcmPipelineStore")
UcmConnectorFactoryV1.register_connector("UcmNfsStore", "ucm.store.pipeline.connector", "UcmNfsStoreV1")
