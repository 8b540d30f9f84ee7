"""The wire contract every podsrl process speaks: messages, codec, sockets, config, metrics."""
