"""Model discovery: which model servers serve which models, held as expiring leases."""

from nilai.discovery.base import Discovery, EndpointRecord, endpoint_id
from nilai.discovery.memory import MemoryDiscovery
from nilai.discovery.redis import RedisDiscovery

__all__ = ["Discovery", "EndpointRecord", "MemoryDiscovery", "RedisDiscovery", "endpoint_id"]
