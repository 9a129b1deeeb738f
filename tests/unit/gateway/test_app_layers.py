"""The middleware stack: a stream's chunks pass it by, so every layer must allow that."""

from nilai.gateway.app import START_ONLY_MIDDLEWARE, create_app
from nilai.gateway.middleware import KeepServerSend
from nilai.settings import NilaiSettings


def test_every_layer_is_one_a_streams_chunks_may_pass_by() -> None:
    app = create_app(NilaiSettings())
    layers = [middleware.cls for middleware in app.user_middleware]
    assert set(layers) <= START_ONLY_MIDDLEWARE, set(layers) - START_ONLY_MIDDLEWARE
    # Outermost, so the send it keeps is the server's own.
    assert layers[0] is KeepServerSend
