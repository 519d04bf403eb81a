"""The running gateway: the Gateway and its parts, the admin server and its pages, peers, systemd."""
