# medgate in a container: docker build -t medgate . && docker run -d --name medgate \
#   -v /etc/medgate/medgate.toml:/etc/medgate/medgate.toml:ro -p 104:104 -p 2575:2575 \
#   -p 9090:9090 medgate
# The config's [gateway] admin listens on 0.0.0.0:9090 (or another port) for the status page to
# be reachable from outside: off loopback it needs admin_token and admin_tls (mount the
# certificate too); the HEALTHCHECK (gateway probe) follows the config and needs no token.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /var/lib/medgate --create-home \
        --shell /usr/sbin/nologin medgate \
    && mkdir -p /etc/medgate /var/log/medgate \
    && chown medgate:medgate /var/log/medgate

COPY . /src/medgate
# The runtime dependencies at the exact versions and hashes of requirements.lock, then medgate.
RUN pip install --no-cache-dir --require-hashes -r /src/medgate/requirements.lock \
    && pip install --no-cache-dir --no-deps /src/medgate && rm -rf /src/medgate

USER medgate
WORKDIR /var/lib/medgate
# DICOM, DICOM TLS, HL7 MLLP, the admin server
EXPOSE 104 11112 2762 2575 9090

# Ready: listeners open, first health checks done, not draining (503 otherwise).
# gateway probe reads the config: HTTPS trusting admin_tls's CA when the admin server is off
# loopback (as it must be for the status page to be published), no token.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["gateway", "probe", "-c", "/etc/medgate/medgate.toml"]

# SIGTERM drains; docker stop's 10 s is less than the default drain_timeout (30 s):
# use docker stop -t 40, or set drain_timeout below it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway", "run", "-c", "/etc/medgate/medgate.toml"]
