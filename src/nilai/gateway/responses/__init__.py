"""The Responses API (OpenAI /v1/responses): signing its answers; the route comes later."""
