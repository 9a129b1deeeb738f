"""Web search: what to search for, the search provider, and the pages behind its results.

Lower layer: nothing here imports the gateway. ``pages`` fetches result pages behind an address
policy (no loopback, private, link-local or metadata addresses, checked after DNS resolution on
every redirect hop, with the connection bound to the checked address), with size, type, redirect
and time limits, and extracts their text off the event loop. The query, the pages and their text
are never logged.
"""
