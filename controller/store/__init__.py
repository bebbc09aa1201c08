"""The controller's durable state, behind one small interface (`Store`), like Patroni's DCS."""

from controller.store.base import AgentRecord, EventRecord, ServiceRecord, Store
from controller.store.sqlite import SqliteStore

__all__ = ["AgentRecord", "EventRecord", "ServiceRecord", "SqliteStore", "Store"]
