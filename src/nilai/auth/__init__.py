"""Who is calling: authenticators turn a bearer credential into a Principal."""

from nilai.auth.api_keys import StaticApiKeys
from nilai.auth.base import Authenticator, Principal

__all__ = ["Authenticator", "Principal", "StaticApiKeys"]
