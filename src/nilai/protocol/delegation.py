"""``GET /v1/delegation`` body."""

from __future__ import annotations

from pydantic import BaseModel, Field


class PromptDelegation(BaseModel):
    """A short-lived NUC that lets the caller store a prompt document for this gateway."""

    token: str = Field(
        description="NUC envelope: the gateway's nilauth root token extended to the caller's "
        "DID with command /nil/db/data/create (pass it to secretvaults / nilai-py as is)."
    )
    did: str = Field(
        description="The gateway's nilDB DID: grant it read access to the stored document."
    )
