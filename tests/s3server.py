"""moto's S3 API server in a process of its own, on a port the OS picks: it prints the port on
its first line of output, then serves until it is terminated.

A port picked by the test and passed in could be taken by another process before the server
binds it; one bound by the server itself cannot."""

from __future__ import annotations

import threading

from moto.server import ThreadedMotoServer


def main() -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()  # returns once the socket is bound and listening
    print(server.get_host_and_port()[1], flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
