"""The tools stage: tool rounds the gateway runs between the relay and the signing."""
