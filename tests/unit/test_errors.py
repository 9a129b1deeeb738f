import pytest

from nilai.errors import (
    AuthenticationFailed,
    InternalError,
    InvalidRequest,
    NilaiError,
    NotFound,
    NotSupported,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
    ValidationFailed,
    error_body,
    to_error_body,
)


@pytest.mark.parametrize(
    ("cls", "status", "error_type", "code"),
    [
        (InvalidRequest, 400, "invalid_request_error", None),
        (ValidationFailed, 422, "invalid_request_error", None),
        (AuthenticationFailed, 401, "authentication_error", "invalid_api_key"),
        (NotFound, 404, "not_found_error", None),
        (UpstreamUnavailable, 503, "service_unavailable", "model_unavailable"),
        (UpstreamProtocolError, 502, "upstream_error", "bad_gateway"),
        (UpstreamTimeout, 504, "timeout_error", "timeout"),
        (NotSupported, 501, "invalid_request_error", "not_supported"),
        (InternalError, 500, "server_error", "internal_error"),
    ],
)
def test_status_type_and_default_code(
    cls: type[NilaiError], status: int, error_type: str, code: str | None
):
    error = cls("something went wrong")
    assert isinstance(error, NilaiError)
    assert error.status == status
    assert error.type == error_type
    assert error.code == code
    assert error.message == "something went wrong"
    assert str(error) == "something went wrong"
    assert to_error_body(error) == {
        "error": {
            "message": "something went wrong",
            "type": error_type,
            "param": None,
            "code": code,
        }
    }


def test_to_error_body_carries_param_and_code():
    error = InvalidRequest("bad tools", param="tools", code="tools_unsupported")
    assert to_error_body(error) == {
        "error": {
            "message": "bad tools",
            "type": "invalid_request_error",
            "param": "tools",
            "code": "tools_unsupported",
        }
    }


def test_explicit_code_overrides_default():
    assert UpstreamUnavailable("x", code="overloaded").code == "overloaded"
    assert AuthenticationFailed("x", code="expired").code == "expired"


def test_authentication_failed_sends_www_authenticate():
    error = AuthenticationFailed("Incorrect API key provided.")
    assert error.headers == {"WWW-Authenticate": "Bearer"}
    assert error.param is None


def test_other_errors_have_no_headers_by_default():
    assert NotFound("x").headers == {}
    assert InvalidRequest("x", headers={"Retry-After": "1"}).headers == {"Retry-After": "1"}


def test_headers_are_not_shared_between_instances():
    first, second = NotFound("a"), NotFound("b")
    first.headers["X"] = "1"
    assert second.headers == {}


def test_base_error_is_a_500():
    error = NilaiError("boom")
    assert error.status == 500
    assert to_error_body(error)["error"]["type"] == "server_error"


def test_error_body_shape():
    assert error_body("m", "t") == {
        "error": {"message": "m", "type": "t", "param": None, "code": None}
    }
