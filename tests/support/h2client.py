"""A raw HTTP/2 client over TLS (the ``h2`` library mitmproxy ships): headers sent as given, no client-side
checks, as an attacker sends them."""

from __future__ import annotations

import socket
import ssl

import h2.config
import h2.connection
import h2.events


def h2_exchange(port: int, headers: list[tuple[str, str]], body: list[bytes]) -> tuple[int, bytes]:
    """One request over TLS + HTTP/2: ``headers`` as given (no client-side checks), then the ``body`` pieces
    (at most 16 KiB each) as flow control lets them go; the answer's status and body."""
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    tls.set_alpn_protocols(["h2"])
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                       validate_outbound_headers=False, normalize_outbound_headers=False)
    pending = [piece for piece in body if piece]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            tls.wrap_socket(raw, server_hostname="localhost") as s:
        assert s.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        conn.increment_flow_control_window(2**30)
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers, end_stream=not pending)
        status, data, done = 0, bytearray(), False
        while not done:
            while pending and conn.local_flow_control_window(stream) >= len(pending[0]):
                piece = pending.pop(0)
                conn.send_data(stream, piece, end_stream=not pending)
            s.sendall(conn.data_to_send())
            if not (chunk := s.recv(65536)):
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            s.sendall(conn.data_to_send())
        return status, bytes(data)
