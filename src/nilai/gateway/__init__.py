"""The HTTP gateway: app factory, services, routes and the chat request pipeline."""
