"""Build the NilRAG retriever from the settings (only when ``NILAI_NILRAG_ENABLED`` is on)."""

from __future__ import annotations

import httpx

from nilai.context.addresses import AddressPolicy
from nilai.context.rag.retriever import Retriever
from nilai.settings import NilaiSettings
from nilai.startup import StartupError

HTTPS_AND_HTTP = frozenset({"http", "https"})


def make_nilrag(settings: NilaiSettings, http: httpx.AsyncClient) -> Retriever | None:
    """The retriever, or None when NilRAG is off; loads the embedding model (blocking: seconds).

    Call it off the event loop. The model is loaded once, here, from a local directory (never
    from a model hub) and checked to give 384 values.

    Raises:
        StartupError: The rag extra is not installed, or the model does not load.
    """
    if not settings.nilrag_enabled:
        return None
    # Imported here: numpy, torch and transformers load only for a gateway that uses NilRAG.
    try:
        from nilai.context.rag.embed import EmbedderError, MiniLMEmbedder  # noqa: PLC0415
        from nilai.context.rag.nodes import HTTPS_ONLY, NilragNodes, NodeLimits  # noqa: PLC0415
        from nilai.context.rag.service import NilRag  # noqa: PLC0415
    except ImportError as exc:
        raise StartupError(
            f"NILAI_NILRAG_ENABLED needs the rag extra (pip install 'nilai[rag,local]'): {exc}"
        ) from exc
    try:
        embedder = MiniLMEmbedder(settings.nilrag_model_dir)
    except EmbedderError as exc:
        raise StartupError(f"NilRAG's embedding model (NILAI_NILRAG_MODEL_DIR): {exc}") from exc
    allowed = settings.nilrag_allow_networks
    nodes = NilragNodes(
        http,
        AddressPolicy(allow=allowed),
        NodeLimits(
            timeout_s=settings.nilrag_node_timeout_s,
            max_response_bytes=settings.nilrag_max_response_bytes,
            max_documents=settings.nilrag_max_documents,
        ),
        # Plain http only towards networks the operator allowlisted (stand-ins on loopback).
        schemes=HTTPS_AND_HTTP if allowed else HTTPS_ONLY,
    )
    retriever = NilRag(
        embedder,
        nodes,
        deadline_s=settings.nilrag_deadline_s,
        max_documents=settings.nilrag_max_documents,
        workers=settings.nilrag_workers,
    )
    retriever.warm_up()
    return retriever
